"""``craft-adapter serve``: the adapter server (``craft_adapter.serve.server.http_app``) on uvicorn.

Every flag can also be set by its ``CRAFT_SERVE_*`` environment variable; a flag wins over the variable.
The vendor key is never a flag (it would show in ``ps``): it is read from ``--key-env``'s variable or
``--key-file``. Torch-free: only the serve package, Starlette and uvicorn are imported.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Annotated, Any

import typer

from craft_adapter.cli.shared import err, fail

ENV = "CRAFT_SERVE_"


def _opt(name: str, help_text: str, *flags: str) -> Any:
    return typer.Option(*flags, envvar=ENV + name.upper(), help=help_text, show_envvar=True)


def serve_cmd(
    adapter: Annotated[Path, typer.Argument(envvar=ENV + "ADAPTER", show_envvar=True,
                                            help="The shipped adapter: .safetensors or exported .onnx.")],
    vendor: Annotated[str, _opt("vendor_url", "Zero-shot vendor endpoint URL (Hugging Face protocol).", "--vendor")],
    host: Annotated[str | None, _opt("host", "Interface to bind; keep 127.0.0.1 behind a proxy.", "--host")] = None,
    port: Annotated[int | None, _opt("port", "Port; 0 picks a free one (one worker only).", "--port")] = None,
    workers: Annotated[int | None, _opt("workers", "Worker processes sharing the port.", "--workers")] = None,
    device: Annotated[str | None, _opt("device", "Refiner device: cpu, auto or cuda.", "--device")] = None,
    vendor_timeout: Annotated[float | None, _opt("vendor_timeout_s", "Seconds for one vendor call.",
                                                 "--vendor-timeout")] = None,
    request_timeout: Annotated[float | None, _opt("request_timeout_s", "Seconds for a whole request, retries "
                                                  "included.", "--request-timeout")] = None,
    retries: Annotated[int | None, _opt("vendor_retries", "Retries of a failed vendor call (429, 5xx, timeout, "
                                        "bad reply).", "--retries")] = None,
    backoff: Annotated[float | None, _opt("backoff_base_s", "First retry's backoff ceiling in seconds (doubles "
                                          "each try, full jitter).", "--backoff")] = None,
    max_vendor_in_flight: Annotated[int | None, _opt("max_vendor_in_flight", "Vendor calls open at once, per "
                                                     "worker.", "--max-vendor-in-flight")] = None,
    max_requests_in_flight: Annotated[int | None, _opt("max_requests_in_flight", "Requests at once per worker; "
                                                       "past it 503.", "--max-requests-in-flight")] = None,
    max_body_bytes: Annotated[int | None, _opt("max_body_bytes", "Largest request body (413 past it).",
                                               "--max-body-bytes")] = None,
    max_batch: Annotated[int | None, _opt("max_batch", "Most images in one batch request.", "--max-batch")] = None,
    max_image_pixels: Annotated[int | None, _opt("max_image_pixels", "Largest image in pixels (413 past it).",
                                                 "--max-image-pixels")] = None,
    top_k: Annotated[int | None, _opt("top_k", "Labels per answer unless the request says top_k.", "--top-k")] = None,
    key_env: Annotated[str | None, _opt("vendor_key_env", "Environment variable holding the vendor API key.",
                                        "--key-env")] = None,
    key_file: Annotated[str | None, _opt("vendor_key_file", "File holding the vendor API key (wins over "
                                         "--key-env).", "--key-file")] = None,
    auth_header: Annotated[str | None, _opt("vendor_auth_header", "Header that carries the key.",
                                            "--auth-header")] = None,
    auth_scheme: Annotated[str | None, _opt("vendor_auth_scheme", "Scheme before the key; empty sends it bare.",
                                            "--auth-scheme")] = None,
    graceful_timeout: Annotated[float | None, _opt("graceful_timeout_s", "Seconds to finish requests in flight "
                                                   "on SIGTERM.", "--graceful-timeout")] = None,
    log_level: Annotated[str | None, _opt("log_level", "critical, error, warning, info or debug.",
                                          "--log-level")] = None,
    access_log: Annotated[bool | None, _opt("access_log", "One JSON log line per request.",
                                            "--access-log/--no-access-log")] = None,
) -> None:
    """Serve ADAPTER over HTTP in front of a zero-shot vendor: classify, Hugging Face shape, health, metrics.

    Unset options take the defaults of ``craft_adapter.serve.server_config.ServerConfig`` (port 8000, 1 worker,
    10 s vendor timeout, 30 s request timeout, 2 retries, 64 vendor calls in flight, 16 MiB bodies, batches of 64).
    """
    from craft_adapter.artifact.adapter_file import AdapterError
    from craft_adapter.serve.server.settings import ServerConfig

    given = dict(
        host=host, port=port, workers=workers, device=device, vendor_timeout_s=vendor_timeout,
        request_timeout_s=request_timeout, vendor_retries=retries, backoff_base_s=backoff,
        max_vendor_in_flight=max_vendor_in_flight, max_requests_in_flight=max_requests_in_flight,
        max_body_bytes=max_body_bytes, max_batch=max_batch, max_image_pixels=max_image_pixels, top_k=top_k,
        vendor_key_env=key_env, vendor_key_file=key_file, vendor_auth_header=auth_header,
        vendor_auth_scheme=auth_scheme, graceful_timeout_s=graceful_timeout,
        log_level=log_level.lower() if log_level else None, access_log=access_log)
    try:
        config = ServerConfig(adapter=str(adapter), vendor_url=vendor,
                              **{k: v for k, v in given.items() if v is not None})
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

    from craft_adapter.serve.server.http_app import create_app, uvicorn_options
    from craft_adapter.serve.server.service import check_servable
    from craft_adapter.serve.shipped import ShippedAdapter

    if config.workers == 1:
        app: Any = create_app(config, key)
    else:
        check_servable(ShippedAdapter.load(config.adapter, config.device))  # fail here, not in every worker
        os.environ.update(config.to_env())  # each worker rebuilds the config from these
        app = "craft_adapter.serve.server.http_app:app_from_env"
    uv = uvicorn.Config(app, host=config.host, port=config.port, workers=config.workers,
                        factory=config.workers > 1, **uvicorn_options(config))
    sock = _listen(uv)
    bound_host, bound_port = sock.getsockname()[:2]
    workers = f" with {config.workers} workers" if config.workers > 1 else ""
    print(f"serving {config.adapter} at http://{bound_host}:{bound_port}{workers}", flush=True)
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
    """Add ``serve`` to ``app``."""
    app.command("serve")(serve_cmd)
