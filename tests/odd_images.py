"""Builders for the odd-but-valid and the broken inputs the pipeline must handle."""

from __future__ import annotations

import io
import pathlib
import socket
import struct
import zlib

import numpy as np
from PIL import Image

from pipeline.sample import photos


def photo(size: tuple[int, int] = (224, 224), name: str = "astronaut") -> Image.Image:
    """A real photo (from scikit-image's bundled files) resized to `size`."""
    return photos()[name].resize(size, Image.Resampling.BICUBIC)


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def exif_rotated_jpeg() -> bytes:
    """A 60x30 JPEG (left half red, right half blue) tagged orientation 6 (rotate 90 CW to display)."""
    arr = np.zeros((30, 60, 3), np.uint8)
    arr[:, :30] = (255, 0, 0)
    arr[:, 30:] = (0, 0, 255)
    img = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(img, "JPEG", quality=95, exif=exif.tobytes())


def cmyk_jpeg() -> bytes:
    return encode(photo((80, 60)).convert("CMYK"), "JPEG", quality=95)


def png16_gray(value: int = 40000) -> bytes:
    """A 16-bit grayscale PNG, every sample `value` (0..65535)."""
    arr = np.full((40, 40), value, dtype=np.uint16)
    return encode(Image.fromarray(arr), "PNG")


def palette_png_with_transparency() -> bytes:
    """A palette PNG: index 0 transparent (its RGB is black), index 1 opaque green."""
    img = Image.new("P", (40, 40), 0)
    img.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    img.paste(1, (20, 0, 40, 40))
    return encode(img, "PNG", transparency=0)


def rgba_png() -> bytes:
    arr = np.zeros((40, 40, 4), np.uint8)
    arr[..., 0] = 200
    arr[..., 3] = 128
    return encode(Image.fromarray(arr, "RGBA"), "PNG")


def animated_gif() -> bytes:
    """Two frames: red then blue; the first frame must be used."""
    red = Image.new("RGB", (40, 40), (255, 0, 0))
    blue = Image.new("RGB", (40, 40), (0, 0, 255))
    return encode(red, "GIF", save_all=True, append_images=[blue], duration=100, loop=0)


def one_pixel_png() -> bytes:
    return encode(Image.new("RGB", (1, 1), (10, 200, 30)), "PNG")


def grayscale_jpeg() -> bytes:
    return encode(photo((64, 48)).convert("L"), "JPEG", quality=95)


def truncated_jpeg() -> bytes:
    data = encode(photo((256, 256)), "JPEG", quality=95)
    return data[: len(data) // 2]


def pixel_bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A tiny PNG file that claims width x height 1-bit pixels (a decompression bomb)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    row = b"\x00" + b"\x00" * ((width + 7) // 8)
    raw = zlib.compress(row * height, 9)
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


GOOD = {
    "grayscale.jpg": grayscale_jpeg,
    "cmyk.jpg": cmyk_jpeg,
    "gray16.png": png16_gray,
    "palette_transparent.png": palette_png_with_transparency,
    "rgba.png": rgba_png,
    "animated.gif": animated_gif,
    "exif_rotated.jpg": exif_rotated_jpeg,
    "one_pixel.png": one_pixel_png,
    "name with spaces.jpg": grayscale_jpeg,
    "ünïcödé 写真.png": one_pixel_png,
}

BAD = {  # name -> (bytes builder, expected reason code)
    "empty.jpg": (lambda: b"", "empty_file"),
    "truncated.jpg": (truncated_jpeg, "truncated_image"),
    "text.jpg": (lambda: b"this is not an image\n" * 10, "not_an_image"),
    "bomb.png": (pixel_bomb_png, "too_many_pixels"),
}


def write_corpus(folder: pathlib.Path) -> dict[str, str]:
    """Write every GOOD and BAD case, plus an unreadable socket file; returns name -> expected outcome."""
    folder.mkdir(parents=True, exist_ok=True)
    expected = {}
    for name, build in GOOD.items():
        (folder / name).write_bytes(build())
        expected[name] = "embedded"
    for name, (build, reason) in BAD.items():
        (folder / name).write_bytes(build())
        expected[name] = reason
    # A unix socket is listed like a file but cannot be opened for reading, even as root.
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(folder / "socket.jpg"))
    sock.close()
    expected["socket.jpg"] = "unreadable"
    (folder / "broken_link.jpg").symlink_to(folder / "does-not-exist.jpg")
    expected["broken_link.jpg"] = "unreadable"
    (folder / "notes.txt").write_text("not an image extension: must be ignored, not counted\n")
    return expected
