"""Reading client input: deep JSON, phone JPEGs, and decodes bounded by what they cost and kept off the loop."""

from __future__ import annotations

import asyncio
import io
import json
import time

import pytest
from anyio import to_thread
from PIL import Image

from craft_adapter.serve.server.image_decoding import DecodeBudget, checked_image, decode_cost, decoded_all
from craft_adapter.serve.server.inputs import ApiError, json_body


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
