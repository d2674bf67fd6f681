"""Reading client input: deep JSON, phone JPEGs, and decodes bounded by what they cost and kept off the loop."""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import random
import string
import time

import pytest
from anyio import to_thread
from PIL import Image

from craft_adapter.serve.server import inputs
from craft_adapter.serve.server.image_decoding import DecodeBudget, checked_image, decode_cost, decoded_all
from craft_adapter.serve.server.inputs import ApiError, b64decode_in_steps, json_body


def encoded(size: tuple[int, int], fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size).save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_json_nested_too_deep_is_a_400_not_a_crash() -> None:
    deep = ("[" * 100_000 + "]" * 100_000).encode()
    with pytest.raises(ApiError) as e:
        json_body(deep)
    assert e.value.status == 400 and e.value.type == "bad_json"
    assert json_body(json.dumps({"a": [1]}).encode()) == {"a": [1]}


def test_a_phone_jpeg_with_a_second_image_is_accepted() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (32, 24)).save(buf, format="MPO", save_all=True, append_images=[Image.new("RGB", (32, 24))])
    data = buf.getvalue()
    assert Image.open(io.BytesIO(data)).format == "MPO"
    assert checked_image(data, 10_000) == data


def test_a_tiny_webp_claiming_40_million_pixels_is_refused_before_decoding() -> None:
    bomb = encoded((6320, 6320), "WEBP", lossless=True)
    assert len(bomb) < 64_000 and decode_cost(bomb, 40_000_000) > 256 << 20
    t0 = time.perf_counter()
    with pytest.raises(ApiError) as e:
        asyncio.run(decoded_all([bomb], 40_000_000, to_thread.run_sync))
    assert e.value.status == 413 and time.perf_counter() - t0 < 0.5  # refused from the header, not decoded


def test_concurrent_decodes_never_exceed_the_budget_and_all_finish() -> None:
    image = encoded((1000, 1000), "PNG")  # 4 MB each to decode
    budget = DecodeBudget(10 << 20)  # room for two at a time
    peak = 0

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, budget.in_use)
            await asyncio.sleep(0)

    async def main() -> list[list[bytes]]:
        watcher = asyncio.create_task(watch())
        done = await asyncio.gather(*(decoded_all([image], 10**7, to_thread.run_sync, budget) for _ in range(12)))
        watcher.cancel()
        return done

    results = asyncio.run(main())
    assert [r == [image] for r in results] == [True] * 12
    assert 0 < peak <= 10 << 20 and budget.in_use == 0


def test_decoding_runs_off_the_event_loop() -> None:
    big = encoded((3000, 3000), "PNG")  # a decode that takes tens of milliseconds
    gaps: list[float] = []

    async def ticker() -> None:
        last = time.perf_counter()
        while True:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    async def main() -> int:
        tick = asyncio.create_task(ticker())
        await asyncio.sleep(0.01)
        t0, before = time.perf_counter(), len(gaps)
        for _ in range(3):
            await decoded_all([big], 10**8, to_thread.run_sync, DecodeBudget(1 << 30))
        assert time.perf_counter() - t0 > 0.03  # the decodes were real work...
        tick.cancel()
        return len(gaps) - before

    ticks = asyncio.run(main())
    assert ticks >= 8  # ...and the loop kept ticking through them (on the loop it could tick once per decode)


def _one_call(value: str) -> bytes | str:
    try:
        return base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError):
        return "refused"


def _in_steps(value: str, step: int) -> bytes | str:
    try:
        return b64decode_in_steps(value, step)
    except (binascii.Error, ValueError):
        return "refused"


def test_base64_in_steps_answers_and_refuses_exactly_as_one_call() -> None:
    rng = random.Random(7)
    alphabet = string.ascii_letters + string.digits + "+/=" + " \n" + "!-_."
    cases = ["", "=", "AA==", "AA==AAAA", "AAAA=", "AAAA==", "A", "AA=A", " A A A A ", "AAA", "QUJD\nREVG"]
    for _ in range(6000):
        if rng.random() < 0.6:  # valid base64, then a few characters (padding, whitespace, junk) slipped in
            v = base64.b64encode(rng.randbytes(rng.randrange(40))).decode()
            for _ in range(rng.randrange(3)):
                k = rng.randrange(len(v) + 1)
                v = v[:k] + rng.choice([rng.choice(alphabet), "=" * rng.randrange(1, 4), " \n"]) + v[k:]
        else:
            v = "".join(rng.choice(alphabet) for _ in range(rng.randrange(30)))
        cases.append(v)
    answers = {"decoded": 0, "refused": 0}
    for v in cases:
        want = _one_call(v)
        answers["refused" if want == "refused" else "decoded"] += 1
        for step in (1, 2, 3, 4, 5, 8, 64):
            assert _in_steps(v, step) == want, (v, step)
    assert min(answers.values()) > 1000  # both kinds well represented


def test_a_big_base64_image_is_decoded_in_bounded_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    # each call holds the GIL, during which the event loop cannot answer anything: no call may get the whole image
    raw = random.Random(1).randbytes(12 << 20)
    text = base64.b64encode(raw).decode()
    sizes: list[int] = []
    real = base64.b64decode

    def spy(s, validate=False):  # noqa: ANN001, ANN202
        sizes.append(len(s))
        return real(s, validate=validate)

    monkeypatch.setattr(inputs.base64, "b64decode", spy)
    assert b64decode_in_steps(text) == raw
    assert len(sizes) >= 16 and max(sizes) <= 2 * inputs.B64_STEP_CHARS
