"""Reduced precision and JPEG draft decoding stay close to fp32 full decoding, on real photos.

Closeness as the project defines it: for every image, the nearest fp32/full-decode embedding of the
corpus is its own, and |fast - reference| / |reference - corpus mean| <= 0.05. (Plain cosine
similarity says little here: with random weights all embeddings are within 0.97 of each other.)
"""

from __future__ import annotations

import numpy as np
import pytest
from odd_images import encode

from pipeline.config import ModelConfig
from pipeline.imaging import decode_image
from pipeline.model import CompiledModel
from pipeline.sample import photos, variant

pytestmark = pytest.mark.slow
SIZE = 224


@pytest.fixture(scope="module")
def jpegs() -> list[bytes]:
    """12 real photos, enlarged to 2-8 MP JPEGs (so draft mode really reduces them)."""
    rng = np.random.default_rng(3)
    return [encode(variant(img, rng, float(rng.uniform(2, 8))), "JPEG", quality=90) for img in photos().values()]


def embed_all(model: CompiledModel, pixels: list[np.ndarray]) -> np.ndarray:
    out = [model(np.stack(pixels[i : i + model.batch_size])) for i in range(0, len(pixels), model.batch_size)]
    return np.concatenate(out)


def assert_close(fast: np.ndarray, reference: np.ndarray, limit: float = 0.05) -> float:
    mean = reference.mean(axis=0)
    rel = np.linalg.norm(fast - reference, axis=1) / np.linalg.norm(reference - mean, axis=1)
    distances = np.linalg.norm(fast[:, None, :] - reference[None, :, :], axis=2)
    assert np.array_equal(distances.argmin(axis=1), np.arange(len(fast))), "an image's nearest neighbour is not itself"
    assert rel.max() <= limit, f"relative error {rel.max():.4f} > {limit}"
    return float(rel.max())


@pytest.fixture(scope="module")
def full_fp32(jpegs):
    model = CompiledModel(ModelConfig(weights="random", image_size=SIZE), batch_size=6)
    pixels = [decode_image(d, size=SIZE, max_pixels=10**9, draft=False)[0] for d in jpegs]
    return model, embed_all(model, pixels)


def test_draft_decode_is_close_to_full_decode(jpegs, full_fp32):
    model, reference = full_fp32
    pixels = [decode_image(d, size=SIZE, max_pixels=10**9, draft=True)[0] for d in jpegs]
    assert_close(embed_all(model, pixels), reference)


def test_bf16_is_close_to_fp32(jpegs, full_fp32):
    _, reference = full_fp32
    model = CompiledModel(ModelConfig(weights="random", image_size=SIZE, precision="bf16"), batch_size=6)
    pixels = [decode_image(d, size=SIZE, max_pixels=10**9, draft=False)[0] for d in jpegs]
    fast = embed_all(model, pixels)
    assert fast.dtype == np.float32
    assert_close(fast, reference)
