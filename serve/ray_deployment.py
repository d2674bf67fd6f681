"""Many adapters across Ray Serve replicas (and machines), with Ray's model multiplexing; Ray is optional.

    pip install "ray[serve]"
    serve run craft_adapter.serve.ray_deployment:build adapters=/srv/adapters vendor_url=https://vendor/v1 \\
        replicas=4 poll_s=2 request_timeout_s=30

The HTTP proxy listens where Ray Serve's HTTP options say (127.0.0.1:8000 unless configured otherwise, e.g.
in a Serve config file's ``http_options``).

Two deployments serve the very routes of ``craft-adapter serve --adapters`` (the same Starlette app,
:func:`~craft_adapter.serve.server.http_app.create_app`):

- ``AdapterIngress`` (HTTP) reads the adapter folder's versions (hot reload, ``name@version`` pins, listing),
  checks each request as the one-process server does, and sends its images to a replica, with the model id
  ``name@version``, so Ray routes it to a replica that already holds that version;
- ``AdapterReplica`` loads adapter versions on demand through ``@serve.multiplexed`` (an LRU of
  ``CRAFT_RAY_ADAPTERS_PER_REPLICA`` versions per replica, default 256), asks the vendor with the
  adapter's labels and template through the replica's one vendor client pool, and refines.

Every node must see the adapter folder at the same path (shared storage, or a synced copy). Ray is never a
dependency of craft-adapter: only this module imports it. Extra ``ServerConfig`` fields (e.g.
``request_timeout_s=10``) can be given as further ``key=value`` arguments.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
from anyio import to_thread
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from craft_adapter.serve.server.adapter_routes import MultiOptions
from craft_adapter.serve.server.adapter_store import AdapterStore, Loaded, Version
from craft_adapter.serve.server.http_app import create_app
from craft_adapter.serve.server.inputs import ApiError
from craft_adapter.serve.server.metrics import ServerMetrics
from craft_adapter.serve.server.service import AdapterService, Classified
from craft_adapter.serve.server.settings import ServerConfig
from craft_adapter.serve.server.vendor_pool import VendorFailure, ZeroShotVendorClient

ADAPTERS_PER_REPLICA = int(os.environ.get("CRAFT_RAY_ADAPTERS_PER_REPLICA", "256"))


def _config(adapters: str, vendor_url: str, settings: dict[str, Any]) -> ServerConfig:
    known = {f.name: f for f in fields(ServerConfig)}
    unknown = sorted(set(settings) - set(known))
    if unknown:
        raise ValueError(f"unknown settings {unknown}; ServerConfig has {sorted(known)}")
    return ServerConfig.from_env({}, adapter=adapters, vendor_url=vendor_url, **settings)


@serve.deployment(ray_actor_options={"num_cpus": 0})
class AdapterReplica:
    """Holds adapter versions (Ray's multiplexed LRU) and answers classifications for the ingress."""

    def __init__(self, adapters: str, vendor_url: str, settings: dict[str, Any]) -> None:
        self.config = _config(adapters, vendor_url, settings)
        self.store = AdapterStore(adapters, self.config.device)
        self.store.refresh()
        self.client: ZeroShotVendorClient | None = None

    @serve.multiplexed(max_num_models_per_replica=ADAPTERS_PER_REPLICA)
    async def adapter(self, ref: str) -> Loaded:
        """The loaded version ``name@version`` (the ingress resolved it; this replica may not have seen it yet)."""
        if self.client is None:  # made in the replica's own event loop
            self.client = ZeroShotVendorClient(self.config, [], "{}", ServerMetrics())
            client = self.client
            self.store.make_service = lambda a: AdapterService(a, client)
        try:
            version = self.store.resolve(ref)
        except ApiError:
            await to_thread.run_sync(self.store.refresh)  # a version newer than this replica's last look
            version = self.store.resolve(ref)
        return await self.store.load(version)

    async def classify(self, images: list[bytes], seconds_left: float) -> dict[str, Any]:
        """Refined probabilities and vendor scores for the multiplexed model id's adapter, or the failure."""
        started = time.monotonic()
        replica = serve.get_replica_context().replica_tag
        try:
            loaded = await self.adapter(serve.get_multiplexed_model_id())
            result = await loaded.service.classify(images, started + seconds_left)
        except VendorFailure as e:
            return {"error": ["vendor", e.type, e.status, e.message, e.retry_after], "replica": replica}
        except ApiError as e:
            return {"error": ["api", e.type, e.status, e.message, None], "replica": replica}
        return {"probabilities": result.probabilities, "vendor_scores": result.vendor_scores, "replica": replica}


class _RemoteService:
    """What the routes need of an adapter service, answered by a replica holding the version."""

    def __init__(self, version: Version, handle: Any, seen: dict[str, set[str]]) -> None:
        self.version, self.handle, self.seen = version, handle, seen
        self.class_names = list(version.class_names)
        self.index = {name: i for i, name in enumerate(self.class_names)}

    async def classify(self, images: list[bytes], deadline: float) -> Classified:
        reply = await self.handle.options(multiplexed_model_id=self.version.ref).classify.remote(
            images, deadline - time.monotonic())
        self.seen[reply["replica"]].add(self.version.ref)
        if "error" in reply:
            kind, type_, status, message, retry_after = reply["error"]
            if kind == "vendor":
                raise VendorFailure(type_, message, retry_after)
            raise ApiError(status, type_, message)
        return Classified(np.asarray(reply["probabilities"]), np.asarray(reply["vendor_scores"]))


class RemoteStore(AdapterStore):
    """The folder's versions, as :class:`AdapterStore` reads them, with every adapter answered by a replica."""

    def __init__(self, root: str | Path, handle: Any) -> None:
        super().__init__(root)
        self.handle = handle
        self.seen: dict[str, set[str]] = defaultdict(set)  # replica -> versions it answered for
        self._services: dict[str, _RemoteService] = {}

    async def acquire(self, ref: str) -> Loaded:
        """The version ``ref`` names now, bound to the replicas."""
        version = self.resolve(ref)
        service = self._services.get(version.sha256)
        if service is None:
            if len(self._services) > 4096:
                self._services.clear()
            service = self._services[version.sha256] = _RemoteService(version, self.handle, self.seen)
        return Loaded(version, service)  # type: ignore[arg-type]


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress()
class AdapterIngress:
    """The HTTP face: the multi-adapter app, with classifications sent to ``AdapterReplica``."""

    def __init__(self, replica: Any, adapters: str, vendor_url: str, settings: dict[str, Any],
                 poll_s: float = 2.0) -> None:
        self.config = _config(adapters, vendor_url, settings)
        self.store = RemoteStore(adapters, replica)
        self.store.refresh()
        self.poll_s = poll_s

    def __serve_build_asgi_app__(self) -> Any:
        app = create_app(self.config, store=self.store, options=MultiOptions(poll_s=self.poll_s))
        app.router.routes.append(Route("/v1/replicas", self.replicas, methods=["GET"]))
        return app

    async def replicas(self, request: Request) -> Response:
        """GET /v1/replicas: which adapter versions each replica has answered for (from this ingress)."""
        return JSONResponse({r: sorted(v) for r, v in self.store.seen.items()})


def build(args: dict[str, str]) -> Any:
    """The Ray Serve application ``serve run craft_adapter.serve.ray_deployment:build key=value ...`` starts."""
    args = dict(args)
    adapters, vendor_url = args.pop("adapters"), args.pop("vendor_url")
    replicas, poll_s = int(args.pop("replicas", "2")), float(args.pop("poll_s", "2.0"))
    env = {"CRAFT_SERVE_" + k.upper(): str(v) for k, v in args.items()}  # the rest: ServerConfig fields
    typed = {k: getattr(ServerConfig.from_env(env, adapter=adapters, vendor_url=vendor_url), k) for k in args}
    replica = AdapterReplica.options(num_replicas=replicas).bind(adapters, vendor_url, typed)
    return AdapterIngress.bind(replica, adapters, vendor_url, typed, poll_s)
