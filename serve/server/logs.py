"""Structured logs for the adapter server: one JSON object per line on stderr, the vendor key scrubbed from all.

The access log (logger ``craft_adapter.access``) writes one line per request with method, path, status,
duration, sizes, request id and, on failure, the error type. Request headers and bodies are never logged.
Every record, uvicorn's included, passes a filter that replaces the vendor key with ``***`` should any
message ever carry it.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from craft_adapter.vendors.credentials import Secret, secret_forms

ACCESS_LOGGER = "craft_adapter.access"
SERVER_LOGGER = "craft_adapter.server"
_LOGGERS = (ACCESS_LOGGER, SERVER_LOGGER, "uvicorn", "uvicorn.error", "uvicorn.access")


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "message", ...extra fields}`` as one JSON line."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as a JSON line."""
        doc: dict[str, Any] = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                               + f".{int(record.msecs):03d}Z", "level": record.levelname.lower(),
                               "logger": record.name, "pid": record.process, "message": record.getMessage()}
        doc.update(getattr(record, "fields", {}))
        if record.exc_info or record.exc_text:
            doc["exception"] = record.exc_text or self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


class ScrubSecret(logging.Filter):
    """Rewrites a record's message so the secret never appears (arguments are folded into the message)."""

    def __init__(self, secret: Secret | None) -> None:
        super().__init__()
        self.secret = secret
        # every form the key can take, found once: Secret.scrub finds them anew on each call, which cost ~70 us per
        # access-log line (a tenth of a request's CPU)
        self._forms = sorted(secret_forms(secret.reveal()), key=len, reverse=True) if secret is not None else []

    def scrub(self, text: str) -> str:
        """``text`` with every form of the secret replaced by ``***``, longest first (as Secret.scrub does)."""
        for form in self._forms:
            if form in text:
                text = text.replace(form, "***")
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        """Scrub and keep the record."""
        if self.secret is not None:
            record.msg, record.args = self.scrub(record.getMessage()), None
            if record.exc_info:
                record.exc_text = self.scrub(logging.Formatter().formatException(record.exc_info))
                record.exc_info = None
            fields = getattr(record, "fields", None)
            if fields:
                record.fields = self._scrub_fields(fields)
        return True

    def _scrub_fields(self, fields: dict[str, Any]) -> dict[str, Any]:
        if all(v is None or isinstance(v, int | float | str) for v in fields.values()):  # flat, as the access log's
            return {k: self.scrub(v) if isinstance(v, str) else v for k, v in fields.items()}
        return json.loads(self.scrub(json.dumps(fields, default=str)))


def setup_logging(level: str, secret: Secret | None, stream: Any = None) -> None:
    """JSON lines on ``stream`` (stderr) for the server's and uvicorn's loggers, scrubbed of ``secret``."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(ScrubSecret(secret))
    for name in _LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level.upper())
        logger.propagate = False
    for name in ("httpx", "httpcore"):  # their INFO lines would carry the vendor URL, query string and all
        logging.getLogger(name).setLevel(logging.WARNING)


def uvicorn_log_config() -> dict[str, Any]:
    """A uvicorn ``log_config`` that leaves logging to :func:`setup_logging` (uvicorn's own access log is off)."""
    return {"version": 1, "disable_existing_loggers": False}
