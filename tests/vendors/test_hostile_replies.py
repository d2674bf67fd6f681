"""The vendor reply contract against a hostile vendor on loopback, for fit's urllib client and the embedding client:
no redirect is followed (a listener records whether the key reached it), gzip bombs and endless replies stop at the
cap (in a separate process whose peak RSS is measured), and a key echoed in any encoding, straddling any cut,
never reaches a message."""

from __future__ import annotations

import base64
import gzip
import subprocess
import sys
import threading
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import quote

import pytest
from conftest import random_images

from craft_adapter.testing.hostile_replies import ECHO_ENCODINGS, echo_form
from craft_adapter.testing.stub_vendor import StubVendor, running_stub
from craft_adapter.vendors.faults import VendorError
from craft_adapter.vendors.http_clients import HttpZeroShotVendor
from craft_adapter.vendors.http_limits import MAX_REPLY_BYTES, BodyReader
from craft_adapter.vendors.openai_embeddings import OpenAIEmbeddingsVendor

KEY = "sk-live-7Qz+w/Xa9_Lm3Np0Rt5Vb8Yc2Hd6Jf4K=="  # +, / and = exercise every encoding's escapes
IMAGE = random_images(1, seed=3)[0]
LABELS = ["cat", "dog", "bird"]


class Recorder(ThreadingHTTPServer):
    """A listener at the address a redirect names: records every request that reaches it."""

    daemon_threads = True

    def __init__(self) -> None:
        self.seen: list[dict[str, str]] = []

        class Handler(BaseHTTPRequestHandler):
            def _record(self) -> None:
                recorder.seen.append(dict(self.headers.items()))
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"[]")

            do_GET = do_POST = _record  # noqa: N815 (http.server's naming)

            def log_message(self, *args: object) -> None:
                pass

        recorder = self
        super().__init__(("127.0.0.1", 0), Handler)


@pytest.fixture(scope="module")
def stub() -> Iterator[StubVendor]:
    with running_stub() as s:
        yield s


@pytest.fixture(scope="module")
def recorder() -> Iterator[Recorder]:
    r = Recorder()
    threading.Thread(target=r.serve_forever, daemon=True).start()
    yield r
    r.shutdown()
    r.server_close()


def zero_shot(url: str, timeout: float = 5.0) -> HttpZeroShotVendor:
    return HttpZeroShotVendor(url, headers={"Authorization": f"Bearer {KEY}"}, timeout=timeout)


def embeddings(url: str) -> OpenAIEmbeddingsVendor:
    return OpenAIEmbeddingsVendor(url, key=KEY, timeout=5.0)


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
@pytest.mark.parametrize("client", ["urllib", "httpx"])
def test_a_redirect_is_never_followed(stub: StubVendor, recorder: Recorder, status: int, client: str) -> None:
    recorder.seen.clear()
    stub.redirect_to, stub.redirect_status = f"http://127.0.0.1:{recorder.server_address[1]}/steal", status
    stub.script = ["redirect"]
    with pytest.raises(VendorError, match=rf"HTTP {status}, a redirect .*never followed") as e:
        if client == "urllib":
            zero_shot(stub.url + "/").score(IMAGE, LABELS, "a {}")
        else:
            embeddings(stub.url).embed_texts(["a cat"])
    assert not e.value.transient and e.value.status == status  # a retry would only pay again
    assert recorder.seen == []  # the key never left for the other host
    assert KEY not in str(e.value)


@pytest.mark.parametrize("kind", ["gzip_bomb", "endless"])
@pytest.mark.parametrize("client", ["urllib", "httpx"])
def test_bombs_and_endless_replies_stop_at_the_cap_in_a_small_process(stub: StubVendor, kind: str,
                                                                      client: str) -> None:
    """600 MB behind each reply; the client process's peak RSS stays far below it."""
    stub.bomb_mb, stub.fault_rate, stub.fault_kinds = 600, 1.0, (kind,)
    try:
        call = ("HttpZeroShotVendor(url + '/', timeout=20).score(random_images(1)[0], ['a', 'b'], '{}')"
                if client == "urllib" else "OpenAIEmbeddingsVendor(url, timeout=20).embed_texts(['a cat'] * 32)")
        script = (
            "import resource, sys\n"
            "from conftest import random_images\n"
            "from craft_adapter.vendors.http_clients import HttpZeroShotVendor\n"
            "from craft_adapter.vendors.openai_embeddings import OpenAIEmbeddingsVendor\n"
            "from craft_adapter.vendors.faults import VendorError\n"
            f"url = {stub.url!r}\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            f"try:\n    {call}\n    print('NO ERROR')\n"
            "except VendorError as e:\n    print('ERROR', e.transient, e)\n"
            "print('PEAK_MB', (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)\n")
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                             cwd="tests", check=True).stdout
    finally:
        stub.fault_rate = 0.0
    assert "ERROR False" in out and "limit" in out, out
    growth = float(out.split("PEAK_MB")[1])
    assert growth < 150, f"the client grew {growth:.0f} MB reading a hostile reply"  # 600 MB unbounded


def test_body_reader_bounds_every_encoding() -> None:
    bomb = gzip.compress(b" " * (50 << 20))
    with pytest.raises(VendorError, match="over the 1000-byte limit"):
        BodyReader("gzip", 1000, "v").feed(bomb)
    raw_deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = raw_deflate.compress(b'{"ok": 1}') + raw_deflate.flush()
    reader = BodyReader("deflate", 1000, "v")  # "deflate" sent raw, without zlib's header, is read too
    reader.feed(body)
    assert reader.finish() == b'{"ok": 1}'
    for coding in ("br", "zstd", "gzip, br"):
        with pytest.raises(VendorError, match="not asked for"):
            BodyReader(coding, 1000, "v")
    truncating = BodyReader("gzip", 1000, "v", truncate=True)  # an error body: its start is enough
    truncating.feed(bomb)
    assert truncating.full and truncating.finish() == b" " * 1000
    assert MAX_REPLY_BYTES == 8 << 20


def key_windows(text: str, form: str, width: int) -> list[str]:
    """The ``width``-character pieces of ``form`` (an encoding of the key) found in ``text``."""
    return [form[i:i + width] for i in range(len(form) - width + 1) if form[i:i + width] in text]


def assert_no_key(message: str, encoding: str) -> None:
    assert not key_windows(message, KEY, 8), message  # not even 8 characters of the key itself
    form = echo_form(KEY, encoding, f"api_key={quote(KEY, safe='')}")
    # base64 of "user:" or "Bearer " shares its first characters with the frame, so its windows are wider
    assert not key_windows(message, form, 8 if encoding in ("raw", "urlencoded", "json", "query") else 12), message


@pytest.mark.parametrize("encoding", ECHO_ENCODINGS)
def test_an_echoed_key_never_reaches_a_message_whatever_the_encoding_and_cut(stub: StubVendor,
                                                                             encoding: str) -> None:
    """Pads from 150 to 215 place the echo before, across and after the 200-character cut."""
    stub.echo_encoding = encoding
    for pad in range(150, 216):
        stub.echo_pad, stub.script = pad, ["echo"]
        if encoding == "query":  # the key in the vendor URL's query, as some APIs take it
            client = HttpZeroShotVendor(f"{stub.url}/?api_key={quote(KEY, safe='')}", timeout=5.0)
        else:
            client = zero_shot(stub.url + "/")
        with pytest.raises(VendorError, match="HTTP 401") as e:
            client.score(IMAGE, LABELS, "a {}")
        assert_no_key(str(e.value), encoding)


@pytest.mark.parametrize("encoding", ["raw", "base64", "basic", "urlencoded"])
def test_the_embedding_client_scrubs_echoes_too(stub: StubVendor, encoding: str) -> None:
    stub.echo_encoding = encoding
    for pad in (180, 195, 199, 200, 205):
        stub.echo_pad, stub.script = pad, ["echo"]
        with pytest.raises(VendorError, match="HTTP 401") as e:
            embeddings(stub.url).embed_texts(["a cat"])
        assert_no_key(str(e.value), encoding)


def test_base64_cores_cover_any_framing() -> None:
    from craft_adapter.vendors.credentials import vendor_detail

    for prefix in ("", "u:", "user:", "Bearer ", "Basic xyz:", "x" * 7):
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            echoed = encode((prefix + KEY).encode()).decode().rstrip("=")
            message = vendor_detail(f"bad key {echoed}", [KEY])
            assert not key_windows(message, echoed[len(prefix) * 4 // 3 + 2:], 6), (prefix, message)
