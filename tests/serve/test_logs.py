"""The server's JSON log lines (:mod:`craft_adapter.serve.server.logs`): the vendor key is scrubbed from the
message, its arguments, a traceback and every field, flat or nested, in every form a vendor may echo it in."""

from __future__ import annotations

import base64
import io
import json
import logging
from collections.abc import Iterator
from urllib.parse import quote

import pytest

from craft_adapter.vendors.credentials import Secret

# isort: split
from craft_adapter.serve.server.logs import ACCESS_LOGGER, SERVER_LOGGER, setup_logging

KEY = "sk-live-7Qz+w/Xa9_Lm3Np0Rt5Vb8Yc2Hd6Jf4K=="
FORMS = [KEY, quote(KEY, safe=""), base64.b64encode(KEY.encode()).decode(), json.dumps(KEY)[1:-1]]


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    out = io.StringIO()
    setup_logging("info", Secret(KEY), out)
    yield out
    for name in (ACCESS_LOGGER, SERVER_LOGGER, "uvicorn", "uvicorn.error", "uvicorn.access"):  # as it set them
        logging.getLogger(name).handlers.clear()


def lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_every_form_of_the_key_is_scrubbed_from_every_part(stream: io.StringIO) -> None:
    log = logging.getLogger(SERVER_LOGGER)
    for form in FORMS:
        log.info("vendor said %s", f"bad key {form}!", extra={"fields": {"event": "x", "detail": form, "n": 3}})
        log.info("nested", extra={"fields": {"event": "y", "echo": {"body": [form]}}})
        try:
            raise RuntimeError(f"refused {form}")
        except RuntimeError:
            log.exception("failed")
    text = stream.getvalue()
    assert not [f for f in FORMS if f in text], text
    got = lines(stream)
    assert got[0]["message"] == "vendor said bad key ***!" and got[0]["detail"] == "***" and got[0]["n"] == 3
    assert got[1]["echo"] == {"body": ["***"]}
    assert "RuntimeError: refused ***" in got[2]["exception"]


def test_an_access_line_keeps_its_fields(stream: io.StringIO) -> None:
    fields = {"event": "request", "request_id": "r1", "status": 200, "duration_ms": 1.5, "client": None}
    logging.getLogger(ACCESS_LOGGER).info("%s %s %s", "GET", "/healthz", 200, extra={"fields": fields})
    (line,) = lines(stream)
    assert line["message"] == "GET /healthz 200" and line["logger"] == ACCESS_LOGGER
    assert {k: line[k] for k in fields} == fields
