"""The reply contract's async path (``send_capped_async``, the server's aiohttp session) against the stub vendor on
loopback: no redirect followed, bombs and endless replies stopped at the cap, an error body cut at its cap without
poisoning the pooled connection, and a session that would decode by itself refused."""

from __future__ import annotations

import asyncio
import base64
import json
import resource
from collections.abc import Iterator

import aiohttp
import numpy as np
import pytest
from conftest import random_images

from craft_adapter.testing.stub_vendor import StubVendor, running_stub, stub_probabilities
from craft_adapter.vendors.faults import VendorError
from craft_adapter.vendors.http_clients import image_base64
from craft_adapter.vendors.http_limits import MAX_ERROR_BYTES, CappedReply, send_capped_async, zero_shot_reply_cap
from craft_adapter.vendors.replies import parse_zero_shot, zero_shot_request

LABELS = ["cat", "dog", "bird"]
IMAGE = image_base64(random_images(1, seed=4)[0])
BODY = json.dumps(zero_shot_request(IMAGE, LABELS, "a {}")).encode()
CAP = zero_shot_reply_cap(LABELS)


@pytest.fixture
def stub() -> Iterator[StubVendor]:
    with running_stub() as s:
        yield s


def post_all(url: str, n: int = 1, **session_options: object) -> list[CappedReply | VendorError]:
    """``n`` calls in turn through one session of one connection; each reply, or the VendorError it raised."""
    async def go() -> list[CappedReply | VendorError]:
        options = {"auto_decompress": False, **session_options}
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1), **options) as session:
            out: list[CappedReply | VendorError] = []
            for _ in range(n):
                try:
                    out.append(await send_capped_async(session, "POST", url, cap=CAP, data=BODY))
                except VendorError as e:
                    out.append(e)
            return out
    return asyncio.run(go())


def test_a_good_reply_is_read_whole(stub: StubVendor) -> None:
    (reply,) = post_all(stub.url + "/")
    assert isinstance(reply, CappedReply) and reply.status == 200
    np.testing.assert_allclose(parse_zero_shot(reply.content, LABELS), stub_probabilities(IMAGE, LABELS), rtol=1e-6)
    assert stub.last_headers["Accept-Encoding"] == "gzip, deflate"


@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_a_redirect_is_refused_not_followed(stub: StubVendor, status: int) -> None:
    stub.redirect_to, stub.redirect_status, stub.script = stub.url + "/elsewhere", status, ["redirect"]
    (error,) = post_all(stub.url + "/")
    assert isinstance(error, VendorError) and not error.transient and error.status == status
    assert "never followed" in str(error) and sum(stub.calls.values()) == 1  # the target was never asked


@pytest.mark.parametrize("kind", ["gzip_bomb", "endless"])
def test_bombs_and_endless_replies_stop_at_the_cap(stub: StubVendor, kind: str) -> None:
    stub.bomb_mb, stub.script = 300, [kind]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    error, after = post_all(stub.url + "/", n=2)
    growth_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert isinstance(error, VendorError) and not error.transient and "limit" in str(error)
    assert growth_mb < 100, f"reading a hostile reply grew this process by {growth_mb:.0f} MB"
    assert isinstance(after, CappedReply) and after.status == 200  # the next call gets a fresh connection


def test_an_error_body_is_cut_at_its_cap_and_its_connection_dropped(stub: StubVendor) -> None:
    stub.echo_encoding, stub.echo_pad, stub.script = "raw", 3 * MAX_ERROR_BYTES, ["echo"]
    cut, after = post_all(stub.url + "/", n=2)
    assert isinstance(cut, CappedReply) and cut.status == 401 and cut.content == b"x" * MAX_ERROR_BYTES
    assert isinstance(after, CappedReply) and after.status == 200
    assert len(parse_zero_shot(after.content, LABELS)) == len(LABELS)  # not the rest of the 401's body


def test_gzip_is_decoded_here_once(stub: StubVendor) -> None:
    stub.bomb_mb, stub.script = 0, ["gzip_bomb"]  # a 0 MB "bomb": a valid gzip body of nothing
    (reply,) = post_all(stub.url + "/")
    # neither handed on compressed (the gzip header's bytes) nor decoded twice (a "does not decode" error)
    assert isinstance(reply, CappedReply) and reply.status == 200 and reply.content == b""


def test_a_session_that_decodes_by_itself_is_refused(stub: StubVendor) -> None:
    with pytest.raises(ValueError, match="auto_decompress=False"):
        post_all(stub.url + "/", auto_decompress=True)
    assert sum(stub.calls.values()) == 0


def test_secrets_in_the_url_stay_out_of_messages(stub: StubVendor) -> None:
    key = base64.b64encode(b"a-secret-key-value").decode()
    stub.redirect_to, stub.redirect_status, stub.script = stub.url + "/", 302, ["redirect"]
    (error,) = post_all(f"{stub.url}/?api_key={key}")
    assert isinstance(error, VendorError) and key not in str(error)
