"""Image decoding without Beam: bytes -> fixed-size uint8 RGB pixels, or DecodeError with a reason.

Decoding rules (documented in README "Decoding"):
- EXIF orientation is applied; width/height are the oriented original size.
- Alpha (RGBA, LA, palette with transparency) is composited over white.
- 16-bit images are scaled to 8 bits (not clipped); CMYK and YCbCr convert to RGB.
- Animated images use their first frame.
- JPEGs are decoded at a reduced DCT scale ("draft": 1/2, 1/4 or 1/8, never below twice
  the target size), which cuts decode time 2-6x; tests/test_closeness.py bounds the effect.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline import reasons

THUMBNAIL_SIZE = 128
# A JPEG codes every 8x8 block of every component with at least ~2 bits (a DC difference and an
# end-of-block code): measured, a uniform 10000x10000 grey image at quality 1 with optimised
# tables is 390,783 bytes, 256 pixels per byte. Eight times that is impossible for a whole file.
JPEG_MIN_PIXELS_PER_BYTE = 2048

# decode_image enforces its own, configurable pixel limit (max_pixels) from the
# header before decoding anything. Pillow's process-wide guard would otherwise
# refuse some images first, with a different limit and message.
Image.MAX_IMAGE_PIXELS = None
_WHITE = (255, 255, 255)
_T = Image.Transpose
_TRANSPOSE = {
    2: _T.FLIP_LEFT_RIGHT,
    3: _T.ROTATE_180,
    4: _T.FLIP_TOP_BOTTOM,
    5: _T.TRANSPOSE,
    6: _T.ROTATE_270,
    7: _T.TRANSVERSE,
    8: _T.ROTATE_90,
}


class DecodeError(Exception):
    """An image that cannot be embedded; `reason` is one of the codes in records."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation tag (1..8; 1 when absent or unreadable)."""
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # a broken EXIF block must not fail an otherwise good image
        return 1
    return orientation if orientation in _TRANSPOSE or orientation == 1 else 1


def _oriented(img: Image.Image, orientation: int) -> Image.Image:
    """Apply an EXIF orientation (what ImageOps.exif_transpose does, without parsing
    the EXIF block a second time or copying the image when there is nothing to do)."""
    method = _TRANSPOSE.get(orientation)
    return img if method is None else img.transpose(method)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.int64)
        # 16-bit samples are 0..65535; scale instead of clipping at 255.
        arr = np.clip(arr, 0, 65535) // 257 if arr.max(initial=0) > 255 else np.clip(arr, 0, 255)
        img = Image.fromarray(arr.astype(np.uint8), mode="L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        lo, hi = float(arr.min(initial=0.0)), float(arr.max(initial=0.0))
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        img = Image.fromarray(((arr - lo) * scale).astype(np.uint8), mode="L")
    has_alpha = img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*_WHITE, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def _resize(img: Image.Image, size: int, mode: str) -> Image.Image:
    w, h = img.size
    if mode == "center-crop":
        # Scale the short side to `size`, then cut the middle square.
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), Image.Resampling.BILINEAR, reducing_gap=3.0)
        left, top = (nw - size) // 2, (nh - size) // 2
        return img.crop((left, top, left + size, top + size))
    if (w, h) == (size, size):
        return img
    return img.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)


def decode_image(
    data: bytes,
    *,
    size: int,
    resize: str = "squash",
    max_pixels: int,
    draft: bool = True,
    thumbnail: bool = False,
    draft_for_thumbnail: bool | None = None,
) -> tuple[np.ndarray, int, int, bytes | None]:
    """Decode one image to (pixels uint8 SxSx3, width, height, thumbnail JPEG or None).

    Args:
        thumbnail: also make the 128 px JPEG thumbnail.
        draft_for_thumbnail: decode JPEGs at a draft scale that covers the thumbnail too
            (default: as `thumbnail`). The scale changes the pixels slightly, so a query
            image must be decoded at the scale its corpus was, without paying for the
            thumbnail itself: query decoding passes True here and `thumbnail=False`.

    Raises DecodeError with a reason code for anything that cannot be embedded.
    """
    if draft_for_thumbnail is None:
        draft_for_thumbnail = thumbnail
    if not data:
        raise DecodeError(reasons.EMPTY_FILE, "the file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise DecodeError(
                    reasons.TOO_MANY_PIXELS,
                    f"{w}x{h} = {w * h:,} pixels exceeds the limit of {max_pixels:,} (--max-pixels)",
                )
            if img.format == "JPEG" and len(data) * JPEG_MIN_PIXELS_PER_BYTE < w * h:
                # libjpeg fills what a scan does not cover with grey and only warns, so a
                # forged or cut header (9000x9000 over a 16x16 scan) would decode "fine".
                raise DecodeError(
                    reasons.TRUNCATED,
                    f"the JPEG header claims {w}x{h} pixels but the file holds only {len(data):,} bytes, "
                    f"fewer than any JPEG of that size needs (truncated or forged header)",
                )
            if draft and img.format == "JPEG":
                # DCT scaling: decode straight to the smallest 1/2, 1/4 or 1/8 scale
                # that still covers twice the target, then resample with reducing_gap.
                # Covering only 1x the target (what Image.thumbnail does) is ~1.5x
                # faster but moved embeddings by up to 0.13 of their spread on real
                # photos; 2x stays under the 0.05 bound of tests/test_closeness.py.
                target = max(2 * size, THUMBNAIL_SIZE if draft_for_thumbnail else 0)
                img.draft("RGB", (target, target))
            if getattr(img, "is_animated", False):
                img.seek(0)
            img.load()
            # After load(): some formats (PNG eXIf after the pixel data) only know it then.
            orientation = _orientation(img)
            width, height = (h, w) if orientation in (5, 6, 7, 8) else (w, h)
            img = _to_rgb(_oriented(img, orientation))
    except DecodeError:
        raise
    except UnidentifiedImageError as exc:
        raise DecodeError(reasons.NOT_AN_IMAGE, f"{type(exc).__name__}: not a recognised image format") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DecodeError(reasons.TOO_MANY_PIXELS, f"{type(exc).__name__}: {exc}") from exc
    except OSError as exc:
        reason = reasons.TRUNCATED if "truncated" in str(exc).lower() else reasons.DECODE_ERROR
        raise DecodeError(reason, f"{type(exc).__name__}: {exc}") from exc
    except Exception as exc:  # any other decoder failure is this image's problem, not the run's
        raise DecodeError(reasons.DECODE_ERROR, f"{type(exc).__name__}: {exc}") from exc
    thumb = None
    if thumbnail:
        small = img.copy()
        small.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE), Image.Resampling.BILINEAR)
        buf = io.BytesIO()
        small.save(buf, format="JPEG", quality=80)
        thumb = buf.getvalue()
    pixels = np.asarray(_resize(img, size, resize), dtype=np.uint8)
    return pixels, width, height, thumb
