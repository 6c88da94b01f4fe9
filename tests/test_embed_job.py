"""The embedding job end to end on the real local Beam runner, with the real model (random weights)."""

from __future__ import annotations

import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from embed_helpers import embed, embeddings_by_id, errors_by_id, manifest, read_dir
from odd_images import encode, photo, write_corpus

from pipeline.records import ERRORS_SCHEMA, embeddings_schema

pytestmark = pytest.mark.slow


def reference_vectors(pixels: np.ndarray, *, pooling: str, size: int, seed: int = 0) -> np.ndarray:
    """ResNet50(include_top=False) applied by hand to preprocess_input of the same pixels."""
    import keras
    from keras.applications.resnet50 import preprocess_input

    keras.utils.set_random_seed(seed)
    model = keras.applications.ResNet50(include_top=False, pooling=pooling, weights=None, input_shape=(size, size, 3))
    return model.predict(preprocess_input(pixels.astype("float32")), verbose=0)


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    expected = write_corpus(root / "odd")
    exact = {}
    for name in ("astronaut", "chelsea", "coffee"):
        img = photo((224, 224), name)
        (root / "exact").mkdir(exist_ok=True)
        (root / "exact" / f"{name}.png").write_bytes(encode(img, "PNG"))
        exact[f"exact/{name}.png"] = np.asarray(img)
    expected.update({k: "embedded" for k in exact})
    expected = {(k if k.startswith("exact/") else f"odd/{k}"): v for k, v in expected.items()}
    return root, expected, exact


@pytest.fixture(scope="module")
def run1(corpus, tmp_path_factory):
    root, _, _ = corpus
    out = tmp_path_factory.mktemp("out1")
    m = embed(root, out, seed=0)
    return out, m, embeddings_by_id(out), errors_by_id(out)


def test_every_input_is_accounted_for(corpus, run1):
    _, expected, _ = corpus
    _, m, vectors, errors = run1
    embedded = {k for k, v in expected.items() if v == "embedded"}
    assert set(vectors) == embedded
    assert {k: row["error"] for k, row in errors.items()} == {k: v for k, v in expected.items() if v != "embedded"}
    c = m["counts"]
    assert c["seen"] == len(expected) == c["embedded"] + c["failed"]
    assert c["embedded"] == len(embedded) and c["reused"] == 0
    assert sum(m["failed_by_reason"].values()) == c["failed"]
    for row in errors.values():
        assert row["message"] and row["stage"] in ("read", "decode")
    assert errors["odd/empty.jpg"]["stage"] == "decode"
    assert errors["odd/socket.jpg"]["stage"] == "read"


def test_exactness_avg_224(corpus, run1):
    _, _, exact = corpus
    _, _, vectors, _ = run1
    names = sorted(exact)
    ref = reference_vectors(np.stack([exact[n] for n in names]), pooling="avg", size=224)
    for name, expected in zip(names, ref, strict=True):
        assert relative_error(vectors[name], expected) < 1e-4, name


def test_exactness_max_pooling_other_size(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    pixels = {}
    for name in ("astronaut", "rocket"):
        img = photo((96, 96), name)
        (src / f"{name}.png").write_bytes(encode(img, "PNG"))
        pixels[f"{name}.png"] = np.asarray(img)
    embed(src, tmp_path / "out", pooling="max", image_size=96, seed=0)
    vectors = embeddings_by_id(tmp_path / "out")
    names = sorted(pixels)
    ref = reference_vectors(np.stack([pixels[n] for n in names]), pooling="max", size=96)
    for name, expected in zip(names, ref, strict=True):
        assert relative_error(vectors[name], expected) < 1e-4, name


def test_schema_and_dtypes_exactly_as_documented(run1):
    out, m, _, _ = run1
    for path in (out / "embeddings").glob("*.parquet"):
        assert pq.read_schema(path).remove_metadata() == embeddings_schema(2048)
    for path in (out / "errors").glob("*.parquet"):
        assert pq.read_schema(path).remove_metadata() == ERRORS_SCHEMA
    table = read_dir(out / "embeddings")
    assert str(table.schema.field("embedding").type) == "fixed_size_list<item: float>[2048]"
    assert set(table.column("model").to_pylist()) == {m["model"]}
    assert len(set(table.column("embedded_at").to_pylist())) == 1  # one timestamp per run
    widths = dict(zip(table.column("id").to_pylist(), table.column("width").to_pylist(), strict=True))
    heights = dict(zip(table.column("id").to_pylist(), table.column("height").to_pylist(), strict=True))
    assert (widths["odd/exif_rotated.jpg"], heights["odd/exif_rotated.jpg"]) == (30, 60)
    assert (widths["exact/astronaut.png"], heights["exact/astronaut.png"]) == (224, 224)
    assert not any(name.startswith("_staging") for name in os.listdir(out))


def test_two_workers_give_the_same_rows(corpus, run1, tmp_path):
    root, _, _ = corpus
    _, m1, vectors1, errors1 = run1
    m2 = embed(root, tmp_path / "out2", workers=2, seed=0)
    vectors2, errors2 = embeddings_by_id(tmp_path / "out2"), errors_by_id(tmp_path / "out2")
    assert m2["counts"] == m1["counts"]
    assert set(vectors2) == set(vectors1)
    for key in vectors1:
        np.testing.assert_allclose(vectors2[key], vectors1[key], rtol=1e-5, atol=1e-6, err_msg=key)
    assert {k: v["error"] for k, v in errors2.items()} == {k: v["error"] for k, v in errors1.items()}
    # One model per worker process, not per bundle or element.
    assert 1 <= m2["model_loads"] <= 2


def test_rerun_gives_identical_embeddings_and_replaces_output(corpus, run1):
    root, _, _ = corpus
    out, m1, vectors1, errors1 = run1
    before = sorted(p.name for p in (out / "embeddings").iterdir())
    m2 = embed(root, out, seed=0)
    vectors2 = embeddings_by_id(out)
    assert sorted(p.name for p in (out / "embeddings").iterdir()) == before
    assert m2["counts"] == m1["counts"]
    assert set(vectors2) == set(vectors1)
    for key in vectors1:
        assert np.array_equal(vectors2[key], vectors1[key]), key
    assert set(errors_by_id(out)) == set(errors1)


def test_a_run_that_reads_nothing_counts_zero_not_null(tmp_path):
    (tmp_path / "empty").mkdir()
    m = embed(tmp_path / "empty", tmp_path / "out")
    c = m["counts"]
    assert isinstance(c["seen"], int) and c["seen"] == c["embedded"] + c["reused"] + c["failed"]
    assert manifest(tmp_path / "out")["counts"] == c
