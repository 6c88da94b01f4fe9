"""Which JPEGs the GPU decoder takes, from the header alone: the rest go to the CPU path, which has the rules.

`route` says so without decoding a pixel: a JPEG the device decodes exactly as libjpeg would
(baseline, extended or progressive Huffman coding; YCbCr or grey; whole; within the pixel limits)
gets a Route with its stored size and EXIF orientation; anything else a short tag saying why not.
Beam-free and CUDA-free, so it runs (and is tested) anywhere.
"""

from __future__ import annotations

import io

from PIL import Image

from pipeline.imaging import JPEG_MIN_PIXELS_PER_BYTE, _orientation

# Frame markers decoded on the device: baseline, extended sequential, progressive (Huffman).
GPU_FRAME_MARKERS = (0xFFC0, 0xFFC1, 0xFFC2)


def jpeg_frame_marker(data: bytes) -> int | None:
    """The SOFn marker (0xFFC0..0xFFCF) of a JPEG, read from its segment headers; None if not found."""
    if data[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image or start of scan before any frame header
            return None
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return 0xFF00 | marker
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        if length < 2:
            return None
        i += 2 + length
    return None


class Route:
    """A JPEG the device decodes: its raw (stored) size and EXIF orientation."""

    __slots__ = ("height", "orientation", "width")

    def __init__(self, width: int, height: int, orientation: int) -> None:
        self.width, self.height, self.orientation = width, height, orientation

    @property
    def oriented(self) -> tuple[int, int]:
        """(width, height) as displayed: what the CPU path reports."""
        return (self.height, self.width) if self.orientation in (5, 6, 7, 8) else (self.width, self.height)


def _stored_as_ycbcr(img: Image.Image) -> bool:
    """libjpeg's rule for 3 components: JFIF means YCbCr; else an Adobe transform of 0 means RGB;
    else component ids "R", "G", "B" mean RGB."""
    if "jfif" in img.info:
        return True
    if "adobe" in img.info or "adobe_transform" in img.info:
        return img.info.get("adobe_transform") != 0
    return [layer[0] for layer in getattr(img, "layer", [])] != [ord("R"), ord("G"), ord("B")]


def route(data: bytes, max_pixels: int) -> Route | str:
    """Route for the device decoder, or why this image goes to the CPU path (a short tag)."""
    if not data:
        return "empty"
    try:
        img = Image.open(io.BytesIO(data))  # lazy: parses the header, reads no pixels
    except Exception:
        return "not_jpeg"
    with img:
        if img.format != "JPEG":  # MPO (a JPEG with more frames) is "MPO": CPU path
            return "not_jpeg"
        w, h = img.size
        if w * h > max_pixels or len(data) * JPEG_MIN_PIXELS_PER_BYTE < w * h:
            return "limits"  # the CPU path raises the same error before decoding anything
        if img.mode not in ("RGB", "L"):
            return "colour"
        if img.mode == "RGB" and not _stored_as_ycbcr(img):
            return "colour"
        if jpeg_frame_marker(data) not in GPU_FRAME_MARKERS:
            return "coding"
        if not data.endswith(b"\xff\xd9"):
            # A cut file: libjpeg (the CPU path) calls it truncated; a GPU decoder may fill in grey.
            return "no_eoi"
        return Route(w, h, _orientation(img))
