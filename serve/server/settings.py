"""The adapter server's settings: one dataclass, filled from flags or ``CRAFT_SERVE_*`` environment variables.

Each field carries its default, its help text and its group in ``metadata``; ``craft-adapter serve``'s options are
generated from them, so each is written once.

Every field ``name`` reads from ``CRAFT_SERVE_<NAME>`` (e.g. ``CRAFT_SERVE_VENDOR_URL``). Worker processes
rebuild the config from the environment, which is how ``--workers N`` hands it to them. The vendor's API key
is never a field: it is read from the variable named by ``vendor_key_env`` or from ``vendor_key_file``, and is
held as a :class:`Secret`, whose ``repr`` and ``str`` are ``***``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from craft_adapter.vendors.credentials import DEFAULT_KEY_ENV, Secret, check_vendor_url, read_key
from craft_adapter.vendors.registry import HF_ZERO_SHOT, available_protocols, hf_only_settings

ENV_PREFIX = "CRAFT_SERVE_"


def setting(default: Any, help_text: str, group: str = "server") -> Any:
    """A :class:`ServerConfig` field: its default, its help text (the CLI's too) and its group (the CLI's panel)."""
    return field(default=default, metadata={"help": help_text, "group": group})


def required(help_text: str) -> Any:
    """A :class:`ServerConfig` field without a default."""
    return field(metadata={"help": help_text, "group": "server"})


@dataclass(frozen=True)
class ServerConfig:
    """Everything ``craft-adapter serve`` can be told; validated on creation. Each field's help text is the CLI's."""

    vendor_url: str = required("Vendor endpoint URL (or an embedding API's base URL); --protocol says which API.")
    adapter: str = setting("", "The shipped adapter: .safetensors or exported .onnx (or use --adapters).")
    adapters: str = setting("", "Serve many adapters: a folder of NAME.safetensors / NAME.onnx files, or a registry "
                            "JSON {\"adapters\": {NAME: path}}; each at /v1/adapters/NAME/..., reloaded on change.",
                            "adapters")
    adapters_memory_mb: float = setting(0.0, "Estimated memory of loaded adapters before the least recently used "
                                        "is unloaded; 0: no bound.", "adapters")
    adapters_poll_s: float = setting(2.0, "Seconds between checks of --adapters for new, changed and removed "
                                     "files.", "adapters")
    adapters_keep_versions: int = setting(3, "Versions per adapter kept pinnable (NAME@sha256-prefix) after its "
                                          "file changes.", "adapters")
    adapter_metrics_top_n: int = setting(50, "Adapters with their own metrics label; the rest count as 'other'.",
                                         "adapters")
    host: str = setting("127.0.0.1", "Interface to bind; keep 127.0.0.1 behind a proxy.")
    port: int = setting(8000, "Port; 0 picks a free one (one worker only).")
    workers: int = setting(1, "Worker processes sharing the port.")
    # the refiner is tiny: CPU answers in microseconds without a GPU round trip
    device: str = setting("cpu", "Refiner device: cpu, auto or cuda.")
    vendor_protocol: str = setting(HF_ZERO_SHOT, "The vendor's API: hf-zero-shot, openai-embeddings, cohere, voyage, "
                                   "embedding-api or an installed plug-in's name; serve adapters fitted through it.",
                                   "vendor")
    vendor_model: str = setting("", "Model name sent to an embedding API (hf-zero-shot names it in the URL).", "vendor")
    vendor_timeout_s: float = setting(10.0, "Seconds for one vendor call.", "vendor")
    request_timeout_s: float = setting(30.0, "Seconds for a whole client request, retries and waits included.",
                                       "vendor")
    vendor_retries: int = setting(2, "Retries of a failed vendor call (429, 5xx, timeout, bad reply).", "vendor")
    backoff_base_s: float = setting(0.05, "First retry's backoff ceiling in seconds (doubles each try, full "
                                    "jitter).", "vendor")
    backoff_max_s: float = setting(2.0, "Largest backoff ceiling in seconds.", "vendor")
    max_vendor_in_flight: int = setting(64, "Vendor calls open at once, per worker.", "limits")
    max_requests_in_flight: int = setting(1024, "Requests at once per worker; past it 503.", "limits")
    max_body_bytes: int = setting(16 << 20, "Largest request body (413 past it).", "limits")
    max_batch: int = setting(64, "Most images in one batch request.", "limits")
    max_image_pixels: int = setting(40_000_000, "Largest image in pixels (413 past it).", "limits")
    top_k: int = setting(5, "Labels per answer unless the request says top_k.")
    vendor_key_env: str = setting(DEFAULT_KEY_ENV, "Environment variable holding the vendor API key.", "vendor")
    vendor_key_file: str = setting("", "File holding the vendor API key (wins over the variable).", "vendor")
    vendor_auth_header: str = setting("Authorization", "Header that carries the key.", "vendor")
    vendor_auth_scheme: str = setting("Bearer", "Scheme before the key; empty sends it bare (e.g. for an "
                                      "X-API-Key header).", "vendor")
    graceful_timeout_s: float = setting(30.0, "Seconds to finish requests in flight on SIGTERM.")
    log_level: str = setting("info", "critical, error, warning, info or debug.")
    access_log: bool = setting(True, "One JSON log line per request.")

    def __post_init__(self) -> None:
        check_vendor_url(self.vendor_url)
        if bool(self.adapter) == bool(self.adapters):
            raise ValueError("give one adapter file (ADAPTER) or a folder of them (--adapters DIR), not "
                             + ("both" if self.adapter else "neither"))
        if self.adapters_memory_mb < 0 or self.adapters_poll_s <= 0 or self.adapters_keep_versions < 1 \
                or self.adapter_metrics_top_n < 0:
            raise ValueError("adapters_memory_mb >= 0, adapters_poll_s > 0, adapters_keep_versions >= 1 and "
                             "adapter_metrics_top_n >= 0 required")
        positive = ("vendor_timeout_s", "request_timeout_s", "backoff_max_s", "max_vendor_in_flight",
                    "max_requests_in_flight", "max_body_bytes", "max_batch", "max_image_pixels", "top_k", "workers")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.vendor_retries < 0 or self.backoff_base_s < 0 or self.graceful_timeout_s < 0:
            raise ValueError("vendor_retries, backoff_base_s and graceful_timeout_s must not be negative")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be 0-65535, got {self.port}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        self._check_protocol()
        if self.log_level not in ("critical", "error", "warning", "info", "debug"):
            raise ValueError(f"log level must be critical, error, warning, info or debug, got {self.log_level!r}")

    def _check_protocol(self) -> None:
        if self.vendor_protocol not in available_protocols():  # built-ins, registrations, installed plug-ins
            raise ValueError(f"unknown vendor protocol {self.vendor_protocol!r}; known: "
                             f"{', '.join(available_protocols())}")
        if self.vendor_protocol == HF_ZERO_SHOT and self.vendor_model:
            raise ValueError("hf-zero-shot takes the model in the endpoint URL; --vendor-model is for the other "
                             "protocols")
        hf_only_settings(self.vendor_protocol, auth_header=self.vendor_auth_header,
                         auth_scheme=self.vendor_auth_scheme)  # ValueError if set for another protocol

    @property
    def vendor_api(self) -> str:
        """The vendor's API as ``/v1/info`` names it."""
        return "hf-zero-shot-image-classification" if self.vendor_protocol == HF_ZERO_SHOT else self.vendor_protocol

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> ServerConfig:
        """A config from ``CRAFT_SERVE_*`` variables in ``env`` (default ``os.environ``), then ``overrides``."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is not None:
                values[f.name] = _parse(raw, f.type, f.name)
        values.update(overrides)
        missing = [n for n in ("vendor_url",) if not values.get(n)]
        if not values.get("adapter") and not values.get("adapters"):
            missing.append("adapter")
        if missing:
            raise ValueError("no " + " and no ".join(f"{ENV_PREFIX}{n.upper()}" for n in missing) + " set")
        return cls(**values)

    def to_env(self) -> dict[str, str]:
        """The ``CRAFT_SERVE_*`` variables that :meth:`from_env` turns back into this config."""
        return {ENV_PREFIX + f.name.upper(): _format(getattr(self, f.name)) for f in fields(self)}

    def vendor_key(self, env: Mapping[str, str] | None = None) -> Secret | None:
        """The vendor's API key from ``vendor_key_file``, else from the variable ``vendor_key_env``; or None."""
        return read_key(self.vendor_key_env, self.vendor_key_file, env)


def _parse(raw: str, kind: Any, name: str) -> Any:
    kind = str(kind)
    try:
        if kind == "bool":
            if raw.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError(raw)
            return raw.lower() in ("1", "true", "yes", "on")
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
    except ValueError:
        raise ValueError(f"{ENV_PREFIX}{name.upper()}={raw!r} is not a valid {kind}") from None
    return raw


def _format(value: Any) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)
