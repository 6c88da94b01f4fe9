"""Memory of query-image decoding: what one decode costs, a budget shared by all requests, giving it back.

A small file can decode to a lot of memory: a 186 KB PNG of 7000x7000 RGBA pixels
needs about 1 GB while Pillow decodes it, composites it over white and converts it.
So the server estimates each decode from the image header before decoding it and
runs decodes only while their estimates fit one budget (`--decode-memory-mb`).
The arithmetic is in docs/SERVE.md.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import ctypes.util
import logging
from collections.abc import AsyncIterator
from typing import BinaryIO

from PIL import Image

from pipeline.imaging import THUMBNAIL_SIZE

log = logging.getLogger(__name__)

# Peak memory of `imaging.decode_image` per decoded pixel, measured as the growth of the
# process's peak RSS (VmHWM) over one decode of a 3000x3000 image in a fresh process, for
# the worst EXIF orientation (a transposed copy), plus ~10 %:
#   WebP: libwebp's RGBA buffer, Pillow's copy, then the alpha path below: 32.5 B measured.
#   alpha (RGBA, LA, PA, P with transparency): the image, its RGBA copy, the white
#     background, the composite and the RGB result: 24.1 B measured (PNG RGBA / LA).
#   wide samples (I;16, I, F): 64-bit numpy temporaries of the 16-to-8-bit scaling: 20-24 B
#     measured depending on content; 28 B is the count of the buffers alive at once.
#   everything else (RGB, L, 1, P, CMYK; JPEG at its draft scale): 8.4 B.
BYTES_PER_PIXEL = {"webp": 36, "alpha": 27, "wide": 28, "plain": 10}
WORST_BYTES_PER_PIXEL = max(BYTES_PER_PIXEL.values())
# What any decode costs beyond its pixels (decoder state, the model input, Python objects).
BASE_COST = 4 << 20
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_WIDE_MODES = {"I", "F", "I;16", "I;16B", "I;16L", "I;16N", "I;32", "I;32B", "I;32L"}


def bytes_per_pixel(img: Image.Image) -> int:
    """The peak-memory factor of decoding an opened (not yet loaded) image."""
    if img.format == "WEBP":
        return BYTES_PER_PIXEL["webp"]
    if img.mode in _ALPHA_MODES or (img.mode == "P" and "transparency" in img.info):
        return BYTES_PER_PIXEL["alpha"]
    if img.mode in _WIDE_MODES:
        return BYTES_PER_PIXEL["wide"]
    return BYTES_PER_PIXEL["plain"]


def decode_cost(stream: BinaryIO, *, nbytes: int, size: int, draft_for_thumbnail: bool, max_pixels: int) -> int:
    """Estimated peak memory in bytes of decoding the image in `stream` (read from its header only).

    Args:
        stream: the encoded image, positioned at its start; it is left at its start.
        nbytes: its length (the encoded bytes are in memory during the decode too).
        size, draft_for_thumbnail: the query model's image size and JPEG draft setting, which
            choose the scale a JPEG decodes at (the same rule as `imaging.decode_image`).
        max_pixels: images over it are refused from the header and cost nothing to decode.
    """
    cost = BASE_COST + nbytes
    try:
        with Image.open(stream) as img:
            width, height = img.size
            if width * height > max_pixels:
                return cost
            factor = bytes_per_pixel(img)
            if img.format == "JPEG":
                # Draft mode decodes at 1/2, 1/4 or 1/8 scale: the header says which.
                target = max(2 * size, THUMBNAIL_SIZE if draft_for_thumbnail else 0)
                img.draft("RGB", (target, target))
                width, height = img.size
    except Exception:  # not an image Pillow knows: decode_image refuses it from the header too
        return cost
    finally:
        stream.seek(0)
    return cost + width * height * factor


class BudgetTimeout(Exception):
    """A request waited longer than allowed for decode memory."""


class DecodeBudget:
    """A memory budget shared by concurrent decodes: each holds its estimate while it decodes.

    Requests are served first come, first served, so a big image is not starved by a
    stream of small ones. An estimate over the whole budget is clamped to it: that image
    decodes alone. Used from one asyncio event loop.
    """

    def __init__(self, total_bytes: int) -> None:
        """Args: total_bytes: the budget (docs/SERVE.md: `--decode-memory-mb`)."""
        if total_bytes < 1:
            raise ValueError(f"the decode memory budget must be positive; got {total_bytes}")
        self.total = total_bytes
        self.used = 0
        self._waiters: collections.deque[tuple[int, asyncio.Future]] = collections.deque()

    @property
    def waiting(self) -> int:
        """Requests waiting for memory now."""
        return len(self._waiters)

    def _wake(self) -> None:
        while self._waiters:
            cost, future = self._waiters[0]
            if future.done():  # timed out or cancelled
                self._waiters.popleft()
                continue
            if self.used + cost > self.total:
                break  # first come, first served: nobody overtakes the head of the queue
            self._waiters.popleft()
            self.used += cost
            future.set_result(None)

    @contextlib.asynccontextmanager
    async def reserve(self, cost: int, timeout: float) -> AsyncIterator[int]:
        """Hold `cost` bytes (clamped to the budget) for the body of the `async with`; yields the amount held.

        Raises:
            BudgetTimeout: the memory did not become free within `timeout` seconds.
        """
        cost = max(1, min(int(cost), self.total))
        if not self._waiters and self.used + cost <= self.total:
            self.used += cost
        else:
            future = asyncio.get_running_loop().create_future()
            self._waiters.append((cost, future))
            try:
                await asyncio.wait_for(asyncio.shield(future), timeout)
            except (asyncio.TimeoutError, asyncio.CancelledError) as exc:
                if future.done() and not future.cancelled():
                    self.used -= cost  # granted just as the wait ended: give it back
                else:
                    future.cancel()
                self._wake()
                if isinstance(exc, asyncio.CancelledError):
                    raise
                raise BudgetTimeout(
                    f"waited {timeout:g} s for {cost / 2**20:,.0f} MiB of decode memory "
                    f"({self.used / 2**20:,.0f} of {self.total / 2**20:,.0f} MiB in use)"
                ) from None
        try:
            yield cost
        finally:
            self.used -= cost
            self._wake()


def _load_malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None


_MALLOC_TRIM = _load_malloc_trim()


def release_memory() -> bool:
    """Hand freed heap memory back to the OS (glibc's malloc_trim); False where there is no glibc.

    glibc keeps freed blocks of Pillow's image buffers in its per-thread arenas: measured,
    eight concurrent 49-megapixel decodes left gigabytes resident after they finished.
    """
    if _MALLOC_TRIM is None:
        return False
    _MALLOC_TRIM(0)
    return True
