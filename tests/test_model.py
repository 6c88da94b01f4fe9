"""The model: weights sources, fingerprint, fixed batch shape, one build per process."""

from __future__ import annotations

import datetime

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from pipeline.config import ModelConfig
from pipeline.embed import EmbedImages
from pipeline.model import CompiledModel, WeightsUnavailableError, build_trunk, use_xla
from pipeline.records import DecodedImage

SIZE = 32


def batch(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)


def test_partial_batches_are_padded_and_traced_once():
    model = CompiledModel(ModelConfig(weights="random", image_size=SIZE, seed=1), batch_size=4)
    x = batch(4)
    full = model(x)
    part = model(x[:3])
    assert full.shape == (4, 2048) and part.shape == (3, 2048) and part.dtype == np.float32
    np.testing.assert_allclose(part, full[:3], rtol=1e-5, atol=1e-6)
    assert model.trace_count() == 1
    with pytest.raises(ValueError, match="exceeds the compiled batch size"):
        model(batch(5))


def test_weights_file_round_trip(tmp_path):
    """A .weights.h5 written by save_weights and a Keras-2-layout *_notop.h5 both load."""
    from keras.src.legacy.saving import legacy_h5_format

    trunk = build_trunk(ModelConfig(weights="random", image_size=SIZE, seed=7))
    new_format = tmp_path / "trunk.weights.h5"
    trunk.save_weights(new_format)
    legacy = tmp_path / "resnet50_notop.h5"
    import h5py

    with h5py.File(legacy, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, trunk)
    x = batch(2)
    expected = CompiledModel(ModelConfig(weights="random", image_size=SIZE, seed=7), 2)(x)
    for path in (new_format, legacy):
        got = CompiledModel(ModelConfig(weights=str(path), image_size=SIZE), 2)(x)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6, err_msg=str(path))
    other = CompiledModel(ModelConfig(weights="random", image_size=SIZE, seed=8), 2)(x)
    assert not np.allclose(other, expected)


def test_missing_or_wrong_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        build_trunk(ModelConfig(weights=str(tmp_path / "nope.weights.h5"), image_size=SIZE))
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5")
    with pytest.raises(WeightsUnavailableError, match="does not fit"):
        build_trunk(ModelConfig(weights=str(junk), image_size=SIZE))


def test_imagenet_unreachable_names_the_alternatives(monkeypatch, tmp_path):
    # Force the download to fail the same way whether or not this machine is online.
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    with pytest.raises(WeightsUnavailableError) as info:
        build_trunk(ModelConfig(weights="imagenet", image_size=SIZE))
    message = str(info.value)
    assert "--weights PATH" in message and "--weights random" in message


def test_fingerprint_names_everything_that_changes_the_vector(tmp_path):
    base = ModelConfig(weights="random")
    variants = [
        ModelConfig(weights="random", seed=1),
        ModelConfig(weights="random", pooling="max"),
        ModelConfig(weights="random", image_size=256),
        ModelConfig(weights="random", resize="center-crop"),
        ModelConfig(weights="random", precision="bf16"),
        ModelConfig(weights="imagenet"),
    ]
    prints = {base.fingerprint()} | {v.fingerprint() for v in variants}
    assert len(prints) == len(variants) + 1
    f1, f2 = tmp_path / "a.weights.h5", tmp_path / "b.weights.h5"
    f1.write_bytes(b"one")
    f2.write_bytes(b"two")
    assert ModelConfig(weights=str(f1)).fingerprint() != ModelConfig(weights=str(f2)).fingerprint()
    assert ModelConfig(weights="random").fingerprint() == base.fingerprint()


@pytest.mark.parametrize(
    "bad", [dict(image_size=31), dict(pooling="flatten"), dict(resize="pad"), dict(precision="int8")]
)
def test_invalid_model_options_are_refused(bad):
    with pytest.raises(ValueError):
        ModelConfig(**bad)


def test_model_built_once_per_process_across_stages_and_bundles():
    """Two EmbedImages stages (two DoFn instances, several bundles) share one model build."""
    cfg = ModelConfig(weights="random", image_size=SIZE, seed=4242)  # a tag no other test uses
    now = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
    pixels = batch(6)
    images = [DecodedImage(f"img{i}", f"mem://{i}", pixels[i], f"sha{i}", SIZE, SIZE) for i in range(6)]
    p = TestPipeline(runner="FnApiRunner")
    a = p | "A" >> beam.Create(images[:3]) | "EmbedA" >> EmbedImages(cfg, batch_size=2, embedded_at=now)
    b = p | "B" >> beam.Create(images[3:]) | "EmbedB" >> EmbedImages(cfg, batch_size=2, embedded_at=now)
    ids = (a.embeddings, b.embeddings) | beam.Flatten() | beam.Map(lambda row: row["id"])
    assert_that(ids, equal_to([f"img{i}" for i in range(6)]))
    result = p.run()
    result.wait_until_finish()
    loads = result.metrics().query(MetricsFilter().with_name("model_loads"))["counters"]
    assert sum(c.committed for c in loads) == 1


def test_xla_auto_and_explicit_give_the_same_vectors():
    x = batch(3, seed=5)
    xla = CompiledModel(ModelConfig(weights="random", image_size=SIZE, seed=2, jit=True), batch_size=3)
    plain = CompiledModel(ModelConfig(weights="random", image_size=SIZE, seed=2), batch_size=3)
    assert xla.jit is True and plain.jit is False  # auto: off below full-size inputs
    a, b = xla(x), plain(x)
    assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()
    assert ModelConfig(jit=True).fingerprint() == ModelConfig(jit=False).fingerprint()
    assert use_xla(ModelConfig(), 32) is True  # full size on this GPU-less machine
    assert use_xla(ModelConfig(), 8) is False and use_xla(ModelConfig(jit=False), 32) is False
