"""A saved .keras model cut at a layer: a fine-tuned ResNet50 end to end, and the cuts that cannot work.

The fine-tuned model is what users bring: `keras.applications.ResNet50` (random seeded weights,
32 px) called as one layer of a model with a pooling layer and a classifier of its own, saved with
model.save. Its vectors through the pipeline must equal the sub-model run by hand, and a width that
is not ResNet50's 2048 must go through the whole chain: nightly embed -> index -> query -> serve
-> a second night that reuses every row. Small hand-built models show each refusal.
"""

from __future__ import annotations

import hashlib
import json
import pathlib

import httpx
import numpy as np
import pytest
from embed_helpers import embeddings_by_id, manifest
from index_fixtures import serve_in_thread
from odd_images import encode, photo

from pipeline.cli import main
from pipeline.config import ModelConfig
from pipeline.errors import ModelFileError
from pipeline.index.query_model import ModelMismatchError

SIZE = 32
NAMES = ("astronaut", "chelsea", "coffee", "rocket")


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def fine_tuned(tmp_path_factory) -> pathlib.Path:
    """ResNet50 + GlobalAveragePooling2D ("features") + a Dense top ("classes"), as Keras' fine-tuning guide has it."""
    import keras

    keras.utils.set_random_seed(11)
    base = keras.applications.ResNet50(weights=None, include_top=False, input_shape=(SIZE, SIZE, 3))
    inputs = keras.Input((SIZE, SIZE, 3), name="image")
    x = keras.layers.GlobalAveragePooling2D(name="features")(base(inputs, training=False))
    outputs = keras.layers.Dense(3, activation="softmax", name="classes")(x)
    path = tmp_path_factory.mktemp("model") / "fine_tuned.keras"
    keras.Model(inputs, outputs).save(path)
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[pathlib.Path, dict[str, np.ndarray]]:
    """PNGs of exactly the model's input size: decoding gives back the very pixels written."""
    folder = tmp_path_factory.mktemp("images")
    pixels = {}
    for name in NAMES:
        img = photo((SIZE, SIZE), name)
        (folder / f"{name}.png").write_bytes(encode(img, "PNG"))
        pixels[f"{name}.png"] = np.asarray(img)
    return folder, pixels


def by_hand(path: pathlib.Path, pixels: np.ndarray, layer: str, *, preprocess: bool = False) -> np.ndarray:
    """The sub-model of the saved file, cut by hand: the outer model's `features`, or a layer of the nested ResNet50."""
    import keras
    from keras.applications.resnet50 import preprocess_input

    model = keras.saving.load_model(path, compile=False)
    x = preprocess_input(pixels.astype("float32")) if preprocess else pixels.astype("float32")
    if layer == "features":
        return keras.Model(model.input, model.get_layer("features").output).predict(x, verbose=0)
    inner = model.get_layer("resnet50")
    return keras.Model(inner.input, inner.get_layer(layer).output).predict(x, verbose=0)


@pytest.mark.slow
def test_the_pooling_layer_of_a_fine_tuned_model_with_its_applications_preprocessing(fine_tuned, corpus, tmp_path):
    folder, pixels = corpus
    out = tmp_path / "out"
    argv = ["embed", "--input", str(folder), "--output", str(out), "--batch-size", "4", "--model", str(fine_tuned)]
    assert main([*argv, "--layer", "features", "--preprocess", "resnet50"]) == 0
    m = manifest(out)
    digest = hashlib.sha256(fine_tuned.read_bytes()).hexdigest()
    assert m["model"] == f"keras/features/avg/32x32/squash/preprocess-resnet50/fp32/sha256:{digest[:16]}"
    assert m["embedding_dim"] == 2048 and m["counts"]["embedded"] == len(NAMES)
    assert m["model_config"] | {"model": None} == {
        "model": None, "layer": "features", "preprocess": "resnet50", "image_size": SIZE, "pooling": "avg",
        "weights": None, "seed": 0, "resize": "squash", "precision": "fp32", "dim": 2048,
    }  # fmt: skip
    vectors = embeddings_by_id(out)
    names = sorted(pixels)
    expected = by_hand(fine_tuned, np.stack([pixels[n] for n in names]), "features", preprocess=True)
    for name, want in zip(names, expected, strict=True):
        assert relative_error(vectors[name], want) < 1e-4, name


@pytest.mark.slow
def test_a_conv_block_of_a_fine_tuned_model_through_index_query_serve_and_a_second_night(
    fine_tuned, corpus, tmp_path, capsys
):
    """1024-d vectors (conv4 of the nested ResNet50, max-pooled) from the nightly to the server, then reused."""
    from pipeline.index.search import Searcher
    from pipeline.serve.app import create_app

    folder, pixels = corpus
    root = tmp_path / "root"
    argv = ["nightly", "--input", str(folder), "--root", str(root), "--batch-size", "4", "--index-type", "flat"]
    argv += ["--model", str(fine_tuned), "--layer", "conv4_block6_out", "--pooling", "max", "--no-report"]
    assert main([*argv, "--run-id", "r1"]) == 0
    run = root / "runs" / "r1"
    m = manifest(run)
    assert m["embedding_dim"] == 1024 and m["model_config"]["layer"] == "resnet50/conv4_block6_out"
    assert m["model"].startswith("keras/resnet50/conv4_block6_out/max/32x32/") and m["validated"] is True
    vectors = embeddings_by_id(run)
    names = sorted(pixels)
    maps = by_hand(fine_tuned, np.stack([pixels[n] for n in names]), "conv4_block6_out")
    for name, want in zip(names, maps.max(axis=(1, 2)), strict=True):
        assert vectors[name].shape == (1024,) and relative_error(vectors[name], want) < 1e-4, name

    index = json.loads((run / "index" / "index.json").read_text())
    assert index["dim"] == 1024 and index["model"] == m["model"] and index["model_config"] == m["model_config"]
    capsys.readouterr()
    query = str(folder / "coffee.png")
    assert main(["query", "--index", str(run / "index"), "--image", query, "-k", "2", "--json"]) == 0
    hits = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert hits[0]["id"] == "coffee.png" and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)

    with Searcher.open(str(run / "index")) as searcher, serve_in_thread(create_app(searcher)) as url:
        data = (folder / "rocket.png").read_bytes()
        r = httpx.post(f"{url}/search", files={"image": ("q.png", data)}, data={"k": 2}, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["results"][0]["id"] == "rocket.png"
        vector = [float(v) for v in vectors["chelsea.png"]]
        r = httpx.post(f"{url}/search", json={"vectors": [vector], "k": 1}, timeout=60)
        assert r.status_code == 200 and r.json()["results"][0][0]["id"] == "chelsea.png", r.text
        assert httpx.get(f"{url}/stats").json()["dim"] == 1024

    assert main([*argv, "--run-id", "r2"]) == 0
    second = manifest(root / "runs" / "r2")
    assert second["mode"] == "incremental" and second["model"] == m["model"]
    assert second["counts"]["reused"] == len(NAMES) and second["counts"]["embedded"] == 0
    again = embeddings_by_id(root / "runs" / "r2")
    assert all(np.array_equal(again[n], vectors[n]) for n in names)
    assert (root / "LATEST").read_text().strip() == "r2"

    # The file changed under the same path: the index's model is not that file any more.
    fine_tuned_bytes = fine_tuned.read_bytes()
    try:
        fine_tuned.write_bytes(b"another model")
        with (
            Searcher.open(str(root / "runs" / "r2" / "index")) as searcher,
            pytest.raises(ModelMismatchError, match="refusing to embed query images"),
        ):
            searcher.search_images([query])
    finally:
        fine_tuned.write_bytes(fine_tuned_bytes)


def test_models_command_lists_the_layers_a_saved_model_can_be_cut_at(fine_tuned, capsys):
    assert main(["models", "--model", str(fine_tuned)]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert "feature map: pooled to 1024" in rows["resnet50/conv4_block6_out"]
    assert "vector of 2048" in rows["features"] and "vector of 3" in rows["classes"]
    assert main(["models", "--model", "resnet50"]) == 2


def _save(model, path: pathlib.Path) -> str:
    model.save(path)
    return str(path)


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> dict[str, str]:
    """Tiny saved models, each built to show one thing about a cut."""
    import keras

    folder = tmp_path_factory.mktemp("small")
    keras.utils.set_random_seed(1)
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", name="conv")(inputs)
    tokens = keras.layers.Reshape((64, 4), name="tokens")(x)
    head = keras.layers.Dense(2, name="head")(keras.layers.GlobalAveragePooling1D(name="pooled")(tokens))
    unsized = keras.Input((None, None, 3))
    pooled = keras.layers.GlobalAveragePooling2D(name="pool")(keras.layers.Conv2D(5, 3, name="conv")(unsized))
    wide = keras.Input((8, 16, 3))
    twice = keras.Input((8, 8, 3))
    block = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(3, 1, name="conv")], name="block")
    other = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(3, 1, name="conv")], name="other")
    doubled = keras.Input((8, 8, 3))
    return {
        "fixed": _save(keras.Model(inputs, head), folder / "fixed.keras"),
        "unsized": _save(keras.Model(unsized, pooled), folder / "unsized.keras"),
        "wide": _save(keras.Model(wide, keras.layers.Conv2D(2, 3, name="conv")(wide)), folder / "wide.keras"),
        "nested": _save(keras.Model(twice, other(block(twice))), folder / "nested.keras"),
        "lambda": _save(keras.Model(doubled, keras.layers.Lambda(lambda t: t * 2)(doubled)), folder / "lambda.keras"),
    }


def test_a_cut_names_its_layer_size_and_width(small):
    fixed = ModelConfig(model=small["fixed"]).resolve()
    assert (fixed.layer, fixed.image_size, fixed.dim) == ("head", 8, 2)  # no --layer: the model's output
    conv = ModelConfig(model=small["fixed"], layer="conv").resolve()
    assert (conv.layer, conv.image_size, conv.dim) == ("conv", 8, 4)
    assert conv.fingerprint().startswith("keras/conv/avg/8x8/squash/preprocess-none/fp32/sha256:")
    assert ModelConfig(model=small["unsized"]).resolve().image_size == 224
    sized = ModelConfig(model=small["unsized"], image_size=40).resolve()
    assert (sized.image_size, sized.dim) == (40, 5) and "/40x40/" in sized.fingerprint()
    inner = ModelConfig(model=small["nested"], layer="block/conv").resolve()
    assert (inner.layer, inner.dim) == ("block/conv", 3)
    # A recorded config (as a manifest keeps it) resolves without loading anything: the file is only hashed.
    assert ModelConfig(**conv.to_record()).resolve() == conv


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("fixed", dict(layer="tokens"), r"outputs shape \(None, 64, 4\); embedpipe embeds a feature map"),
        ("fixed", dict(layer="cnv"), r"'cnv' is not a layer of .*fixed.keras; did you mean conv\?"),
        ("fixed", dict(image_size=16), r"takes 8x8 inputs; --image-size 16 cannot feed it"),
        ("wide", {}, r"takes 8x16 inputs; embedpipe feeds square images"),
        ("nested", dict(layer="conv"), r"names 2 layers of .*: block/conv, other/conv; give its path"),
        ("lambda", {}, r"cannot load the saved model .*Lambda layers are refused"),
    ],
)
def test_cuts_that_cannot_work_say_why(small, name, kwargs, message):
    with pytest.raises(ModelFileError, match=message):
        ModelConfig(model=small[name], **kwargs).resolve()


def test_a_bad_cut_stops_embed_before_anything_is_written(small, tmp_path, capsys):
    (tmp_path / "in").mkdir()
    argv = ["embed", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--model", small["fixed"]]
    assert main([*argv, "--layer", "tokens"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "embedpipe: error: --layer 'tokens' of" in err[0], err
    assert not (tmp_path / "out").exists()
