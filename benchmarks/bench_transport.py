"""How decoded pixels should cross the shuffle in `--decode-stage separate`: bytes per image and CPU cost.

Decodes N JPEG variants (1-4 MP) of the sample photos to the model's input (224x224x3 uint8, the
pipeline's own decode), then for each lossless encoding prints bytes per image, the ratio to raw,
and encode / decode milliseconds per image (best of 3 passes, one core). Every encoding is checked
to give the pixels back exactly. pipeline/transport.py uses the winner; docs/COST.md prices it.

    python benchmarks/bench_transport.py [--count 48] [--size 224]
"""

from __future__ import annotations

import argparse
import io
import pathlib
import sys
import time
import zlib

import numpy as np
from PIL import Image

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from pipeline import transport
from pipeline.imaging import decode_image
from pipeline.records import DecodedImage
from pipeline.sample import jpeg_bytes, photos, variant


def _png(pixels: np.ndarray, level: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG", compress_level=level)
    return buf.getvalue()


def _from_image(blob: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(blob)) as img:
        return np.asarray(img.convert("RGB"))


def codecs(shape: tuple[int, ...]) -> dict:
    import zstandard

    zc, zd = zstandard.ZstdCompressor(level=1), zstandard.ZstdDecompressor()

    def raw(b: bytes) -> np.ndarray:
        return np.frombuffer(b, np.uint8).reshape(shape)

    def record(p: np.ndarray) -> DecodedImage:
        return DecodedImage("id", "uri", p, "0" * 64, 1, 1)

    return {
        "raw uint8": (lambda p: p.tobytes(), raw),
        "zlib-1": (lambda p: zlib.compress(p.tobytes(), 1), lambda b: raw(zlib.decompress(b))),
        "zstd-1": (lambda p: zc.compress(p.tobytes()), lambda b: raw(zd.decompress(b))),
        "png-1": (lambda p: _png(p, 1), _from_image),
        "webp lossless m0 (transport.py)": (
            lambda p: transport.encode(record(p)),
            lambda b: transport.decode(b).pixels,
        ),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=48)
    ap.add_argument("--size", type=int, default=224)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    base = photos()
    names = sorted(base)
    pixels = []
    for i in range(args.count):
        data = jpeg_bytes(variant(base[names[i % len(names)]], rng, float(rng.uniform(1, 4))), quality=90)
        pixels.append(decode_image(data, size=args.size, max_pixels=10**8)[0])
    raw_bytes = pixels[0].nbytes
    print(f"{args.count} photos (1-4 MP JPEG) decoded to {args.size}x{args.size}x3 uint8 = {raw_bytes:,} bytes raw")
    print(f"{'encoding':<34}{'bytes/img':>11}{'vs raw':>8}{'enc ms':>8}{'dec ms':>8}")
    for name, (enc, dec) in codecs(pixels[0].shape).items():
        best_enc = best_dec = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            blobs = [enc(p) for p in pixels]
            best_enc = min(best_enc, (time.perf_counter() - t) / len(pixels))
            t = time.perf_counter()
            back = [dec(b) for b in blobs]
            best_dec = min(best_dec, (time.perf_counter() - t) / len(pixels))
        assert all(np.array_equal(a, b) for a, b in zip(pixels, back)), f"{name} is not lossless"
        size = sum(len(b) for b in blobs) / len(blobs)
        print(f"{name:<34}{size:>11,.0f}{size / raw_bytes:>8.2f}{best_enc * 1e3:>8.2f}{best_dec * 1e3:>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
