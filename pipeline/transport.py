"""How decoded images cross the shuffle between a decode stage and an inference stage.

With `--decode-stage separate`, CPU workers decode and GPU workers embed, so every decoded
image (its pixels at the model's input size, S x S x 3 uint8, and its small fields) is written
to the shuffle and read back on a GPU worker. Pixels travel as lossless WebP (method 0): the
same bytes come out, exactly, so vectors equal the fused pipeline's.

Why WebP lossless, measured on 48 decoded 1-4 MP photos at 224 px (benchmarks/bench_transport.py,
docs/BENCHMARKS.md): raw uint8 is 150,528 bytes per image; zstd-1 0.79 of that (1 ms to
encode); PNG-1 0.56 (7 ms); WebP lossless 0.44 (5 ms to encode, 2 ms to decode). The shuffle is
billed per GB, and at a few thousand images per second per GPU the shuffled bytes cost more than
the CPU time that halves them (docs/COST.md).
"""

from __future__ import annotations

import io
import pickle

import numpy as np
from PIL import Image

from pipeline.records import DecodedImage

FORMAT_VERSION = 1


def encode(image: DecodedImage) -> bytes:
    """A DecodedImage as bytes: lossless WebP pixels plus its other fields."""
    pixels = np.ascontiguousarray(image.pixels, dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buf, format="WEBP", lossless=True, method=0, quality=0, exact=True)
    fields = (
        FORMAT_VERSION,
        image.id,
        image.uri,
        buf.getvalue(),
        image.content_sha256,
        image.width,
        image.height,
        image.meta,
        image.thumbnail,
        image.marker,
    )
    return pickle.dumps(fields, protocol=pickle.HIGHEST_PROTOCOL)


def decode(blob: bytes) -> DecodedImage:
    """The DecodedImage of `encode`'s bytes, pixels exactly as they were."""
    version, rid, uri, webp, sha, width, height, meta, thumbnail, marker = pickle.loads(blob)
    if version != FORMAT_VERSION:
        raise ValueError(f"decoded-image transport format {version}, expected {FORMAT_VERSION}")
    with Image.open(io.BytesIO(webp)) as img:
        pixels = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return DecodedImage(rid, uri, pixels, sha, width, height, meta, thumbnail, marker=marker)
