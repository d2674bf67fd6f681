"""``craft-adapter serve``: the adapter server (``craft_adapter.serve.server.http_app``) on uvicorn.

One option per field of :class:`~craft_adapter.serve.server.settings.ServerConfig`, generated from the fields (help
text, default, panel). Every flag can also be set by its ``CRAFT_SERVE_*`` environment variable; a flag wins over
the variable, and an option set by neither takes the field's default.
The vendor key is never a flag (it would show in ``ps``): it is read from ``--key-env``'s variable or
``--key-file``. Torch-free: only the serve package, Starlette and uvicorn are imported.
"""

from __future__ import annotations

import os
import socket
from typing import Any

import typer

from craft_adapter.cli.shared import err, fail, options_from, with_options

ENV = "CRAFT_SERVE_"
# Flags that are shorter than their field's name; every other field's flag is --field-name.
FLAGS = {"vendor_url": "--vendor", "vendor_timeout_s": "--vendor-timeout", "request_timeout_s": "--request-timeout",
         "vendor_retries": "--retries", "backoff_base_s": "--backoff", "backoff_max_s": "--backoff-max",
         "vendor_key_env": "--key-env", "vendor_key_file": "--key-file", "vendor_auth_header": "--auth-header",
         "vendor_auth_scheme": "--auth-scheme", "graceful_timeout_s": "--graceful-timeout",
         "adapters_poll_s": "--adapters-poll", "adapters_keep_versions": "--keep-versions",
         "vendor_protocol": "--protocol"}
PANELS = {"vendor": "The vendor behind the server", "limits": "Limits per worker",
          "adapters": "Many adapters (--adapters DIR)"}


def serve_cmd(**given: Any) -> None:
    """Serve ADAPTER (or every adapter in --adapters DIR) over HTTP in front of its vendor (--protocol)."""
    from craft_adapter.artifact.adapter_file import AdapterError
    from craft_adapter.serve.server.settings import ServerConfig

    if given.get("log_level"):
        given["log_level"] = given["log_level"].lower()
    try:
        config = ServerConfig(**{k: v for k, v in given.items() if v is not None})
        key = config.vendor_key()
        if config.workers > 1 and config.port == 0:
            raise ValueError("--workers above 1 needs a fixed --port")
    except ValueError as e:
        raise fail(str(e)) from None
    if config.host not in ("127.0.0.1", "localhost", "::1"):
        err.print(f"[yellow]warning:[/] listening on {config.host}: anyone who can reach it can use the vendor "
                  "through it")
    try:
        _run(config, key)
    except AdapterError as e:
        raise fail(str(e)) from None


def _run(config: Any, key: Any) -> None:
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    from craft_adapter.serve.server.adapter_store import AdapterStore
    from craft_adapter.serve.server.connections import raise_open_file_limit
    from craft_adapter.serve.server.http_app import create_app, uvicorn_options
    from craft_adapter.serve.server.runtime_service import protocol_vendor
    from craft_adapter.serve.server.service import check_servable
    from craft_adapter.serve.shipped import ShippedAdapter

    raise_open_file_limit()  # every socket is a file: a low limit would cap connections, not the server's bounds
    if config.workers == 1:
        app: Any = create_app(config, key)
    else:  # fail here, not in every worker
        vendor = protocol_vendor(config, key)
        if config.adapters:
            AdapterStore(config.adapters, config.device, vendor=vendor).refresh()
        else:
            check_servable(ShippedAdapter.load(config.adapter, config.device), vendor)
        os.environ.update(config.to_env())  # each worker rebuilds the config from these
        app = "craft_adapter.serve.server.http_app:app_from_env"
    uv = uvicorn.Config(app, host=config.host, port=config.port, workers=config.workers,
                        factory=config.workers > 1, **uvicorn_options(config))
    sock = _listen(uv)
    bound_host, bound_port = sock.getsockname()[:2]
    workers = f" with {config.workers} workers" if config.workers > 1 else ""
    print(f"serving {config.adapter or config.adapters} at http://{bound_host}:{bound_port}{workers}", flush=True)
    if config.workers == 1:
        uvicorn.Server(uv).run(sockets=[sock])
        return
    try:
        supervisor = Multiprocess(uv, sockets=[sock])
    except TypeError:  # uvicorn before the supervisor took its target from the config
        supervisor = Multiprocess(uv, target=uvicorn.Server(uv).run, sockets=[sock])  # type: ignore[call-arg]
    supervisor.run()


def _listen(uv: Any) -> socket.socket:
    """uvicorn's listening socket, with Nagle's algorithm off for every connection it accepts.

    A socket uvicorn binds itself is created without an explicit protocol, so asyncio does not set TCP_NODELAY on
    the connections; a response's headers and body then go out as two small writes, and the body waits for the
    client's delayed ACK (about 40 ms on Linux) on every keep-alive request. Linux copies the option from the
    listening socket to each accepted one. It listens at once, so connections made as soon as the address is
    printed wait in the backlog for the app's startup instead of being refused.
    """
    sock = uv.bind_socket()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.listen(uv.backlog)
    return sock


def register(app: typer.Typer) -> None:
    """Add ``serve`` to ``app``, one option per :class:`ServerConfig` field (unset: the variable, else the default)."""
    from craft_adapter.serve.server.settings import ServerConfig

    options = options_from(ServerConfig, panels=PANELS, flags=FLAGS, arguments=("adapter",), env_prefix=ENV,
                           unset=True)
    app.command("serve")(with_options(serve_cmd, options.values()))
