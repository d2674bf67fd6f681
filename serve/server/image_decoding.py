"""Client images, checked and decoded within a memory bound: the server never trusts what a small file claims.

A small file can claim a huge image (a 2 KB WebP of 6320x6320 pixels decodes to about 550 MB), so decoding is
bounded by what it will cost, not by what was sent: each image's size is read from its header first, its decode
reserves that many bytes from one per-process :class:`DecodeBudget`, and every decode but a thumbnail's runs off
the event loop. A request that cannot fit the budget even alone is 413; others wait their turn. A body that is
not an image in a supported format is 415, a damaged one 400, one over the pixel limit 413.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Awaitable, Callable
from typing import Any

from PIL import Image, UnidentifiedImageError

from craft_adapter.serve.server.inputs import ApiError

SUPPORTED_FORMATS = frozenset({"PNG", "JPEG", "MPO", "WEBP", "GIF", "BMP", "TIFF"})  # MPO: a phone's JPEG


# the only PIL openers that may look at a body (less to attack, less to try); MPO comes from the JPEG opener
OPENERS = sorted(SUPPORTED_FORMATS - {"MPO"})


DECODE_BUDGET_BYTES = 192 << 20  # decoded bytes in flight per process, all requests together (a 40 M-pixel PNG fits)


DECODE_BYTES_PER_PIXEL = {"WEBP": 14}  # libwebp decodes through RGBA and a copy (measured: 550 MB for 40 M px)


DEFAULT_BYTES_PER_PIXEL = 4


# a request this small (a thumbnail: at most 16 K pixels, e.g. 128x128, from at most 64 KB) decodes in about as
# long as the hop to a worker thread and back costs (measured: 0.02 ms for 28x28, 0.08 ms for 128x128 PNG noise;
# a 256x256 progressive JPEG took 1.4 ms, too long), so it decodes on the event loop; all else goes off it
INLINE_MAX_DECODED = 64 << 10


INLINE_MAX_BYTES = 64 << 10


def checked_image(data: bytes, max_pixels: int) -> bytes:
    """``data`` itself once PIL has decoded it fully as a supported image within ``max_pixels``; else ApiError."""
    if not data:
        raise ApiError(400, "bad_image", "the image is empty")
    try:
        with Image.open(io.BytesIO(data), formats=OPENERS) as im:
            if im.format not in SUPPORTED_FORMATS:
                raise ApiError(415, "unsupported_image", f"{im.format} images are not accepted; send one of "
                               f"{', '.join(sorted(SUPPORTED_FORMATS))}")
            width, height = im.size
            if width * height > max_pixels:
                raise ApiError(413, "image_too_large", f"the image is {width}x{height} pixels; the limit is "
                               f"{max_pixels} pixels")
            im.load()
    except UnidentifiedImageError:
        raise ApiError(415, "unsupported_image", "the body is not an image in a supported format ("
                       f"{', '.join(sorted(SUPPORTED_FORMATS))})") from None
    except Image.DecompressionBombError:
        raise ApiError(413, "image_too_large", "the image decompresses past the pixel limit") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ApiError(400, "bad_image", f"the image is damaged or truncated ({type(e).__name__})") from None
    return data


class DecodeBudget:
    """Decoded bytes in flight, bounded: a decode waits until its bytes fit (first come, first served)."""

    def __init__(self, capacity: int) -> None:
        self.capacity, self.in_use = capacity, 0
        self._changed: asyncio.Condition | None = None  # made on first use, inside the server's event loop

    async def reserve(self, n: int) -> None:
        """Wait until ``n`` more bytes fit; 413 if they never could."""
        if n > self.capacity:
            raise ApiError(413, "image_too_large", f"decoding this request needs about {n >> 20} MB, over the "
                           f"server's {self.capacity >> 20} MB decode bound; send smaller images or fewer at once")
        self._changed = self._changed or asyncio.Condition()
        async with self._changed:
            await self._changed.wait_for(lambda: self.in_use + n <= self.capacity)
            self.in_use += n

    async def release(self, n: int) -> None:
        """Give ``n`` bytes back and wake the waiters."""
        assert self._changed is not None
        async with self._changed:
            self.in_use -= n
            self._changed.notify_all()


DECODE_BUDGET = DecodeBudget(DECODE_BUDGET_BYTES)


def webp_canvas(data: bytes) -> tuple[int, int] | None:
    """A WebP file's canvas size from its first chunk (VP8, VP8L or VP8X), or None if the header has none.

    Read by hand because PIL's WebP opener builds libwebp's decoder, which allocates the whole canvas (160 MB for
    40 M pixels) just to report the size: on the event loop, that is what a stream of tiny WebP bombs costs.
    """
    chunk = data[12:16]
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        return int.from_bytes(data[26:28], "little") & 0x3FFF, int.from_bytes(data[28:30], "little") & 0x3FFF
    if chunk == b"VP8X" and len(data) >= 30:
        return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    return None


def decode_cost(data: bytes, max_pixels: int) -> int:
    """Bytes that decoding ``data`` will take, from its header alone; the same errors as :func:`checked_image`."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":  # never through PIL's opener on the event loop (see above)
        size = webp_canvas(data)
        if size is None:
            raise ApiError(400, "bad_image", "the WebP header gives no canvas size; the image is damaged")
        width, height = size
        if width * height > max_pixels:
            return 0  # refused by checked_image before its decoder exists
        return width * height * DECODE_BYTES_PER_PIXEL["WEBP"]
    try:
        with Image.open(io.BytesIO(data), formats=OPENERS) as im:
            if im.format not in SUPPORTED_FORMATS:
                return 0  # refused by checked_image without decoding
            width, height = im.size
            fmt = im.format
    except Exception:  # noqa: BLE001 (anything unreadable is refused by checked_image, which names the cause)
        return 0
    if width * height > max_pixels:
        return 0
    return width * height * DECODE_BYTES_PER_PIXEL.get(fmt, DEFAULT_BYTES_PER_PIXEL)


async def decoded_all(images: list[bytes], max_pixels: int,
                      to_thread: Callable[..., Awaitable[Any]] | None = None,
                      budget: DecodeBudget = DECODE_BUDGET) -> list[bytes]:
    """Every image checked by :func:`checked_image`, decoded within the decode ``budget``, off the event loop
    unless the whole request is tiny (see :data:`INLINE_MAX_BYTES`)."""
    cost = sum(decode_cost(b, max_pixels) for b in images)
    await budget.reserve(cost)
    try:
        if to_thread is None or (cost <= INLINE_MAX_DECODED and sum(map(len, images)) <= INLINE_MAX_BYTES):
            return [checked_image(b, max_pixels) for b in images]
        return await to_thread(lambda: [checked_image(b, max_pixels) for b in images])
    finally:
        await budget.release(cost)

