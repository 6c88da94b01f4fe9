"""The Keras applications --model takes: the table checked against Keras, the fingerprints, and exact vectors.

The table (pipeline/applications.py) is what the driver and `embedpipe models` read without
building anything; here it is checked against Keras itself: the weights files and hashes against
Keras' own tables, the default and smallest input sizes against what each constructor asks of
`obtain_input_shape`, and (slow) the vector width against every model built. EfficientNetV2-B0
and ConvNeXt-Tiny then run through the real pipeline (random seeded weights, 32-64 px) and must
give the vectors of the Keras model run by hand with the application's own preprocess_input.
"""

from __future__ import annotations

import importlib
import inspect
import json

import numpy as np
import pytest
from embed_helpers import embeddings_by_id, manifest
from odd_images import encode, photo

from pipeline.applications import APPLICATIONS
from pipeline.cli import main
from pipeline.config import EmbedConfig, ModelConfig
from pipeline.job import run_embed


def _keras_weights(app) -> tuple[object, str]:
    """(the keras.src module that builds an application, its key in that module's WEIGHTS_HASHES)."""
    family, _, variant = app.name.partition("-")
    if family.startswith("resnet"):
        return importlib.import_module("keras.src.applications.resnet"), app.name
    if family == "efficientnetv2":
        return importlib.import_module("keras.src.applications.efficientnet_v2"), (
            variant if variant.startswith("b") else f"-{variant}"
        )
    return importlib.import_module("keras.src.applications.convnext"), f"convnext_{variant}"


class _Asked(Exception):
    """Raised in place of obtain_input_shape: the sizes a constructor asked for, before any layer is built."""

    def __init__(self, kwargs: dict) -> None:
        super().__init__("asked")
        self.kwargs = kwargs


@pytest.mark.parametrize("name", list(APPLICATIONS))
def test_each_row_names_what_keras_builds_and_downloads(name, monkeypatch):
    import keras
    from keras.src.applications import imagenet_utils

    app = APPLICATIONS[name]
    module, key = _keras_weights(app)
    # Keras' own URL and hash of the weights without the classifier (what get_file checks).
    assert module.WEIGHTS_HASHES[key][1] == app.weights_hash
    suffix = "_weights_tf_dim_ordering_tf_kernels_notop.h5" if module.__name__.endswith("resnet") else "_notop.h5"
    built_name = {"efficientnet_v2": f"efficientnetv2-{key.lstrip('-')}"}.get(module.__name__.rsplit(".")[-1], key)
    assert app.weights_url == f"{module.BASE_WEIGHTS_PATH}{built_name}{suffix}"
    # The preprocessing the graph applies is the application's own.
    assert callable(importlib.import_module(f"keras.applications.{app.module}").preprocess_input)

    signature = inspect.signature(imagenet_utils.obtain_input_shape)

    def asked(*args, **kwargs):
        raise _Asked(signature.bind(*args, **kwargs).arguments)

    monkeypatch.setattr(imagenet_utils, "obtain_input_shape", asked)
    with pytest.raises(_Asked) as info:
        getattr(keras.applications, app.keras_name)(weights=None, include_top=False)
    assert (info.value.kwargs["default_size"], info.value.kwargs["min_size"]) == (app.default_size, app.min_size)


@pytest.mark.slow
def test_every_application_builds_headless_with_the_width_its_row_names():
    """Each model built once at its smallest input (layers only: weights are not initialised)."""
    import keras

    for app in APPLICATIONS.values():
        with keras.StatelessScope():
            model = getattr(keras.applications, app.keras_name)(
                weights=None, include_top=False, pooling="avg", input_shape=(app.min_size, app.min_size, 3)
            )
        assert tuple(model.output.shape) == (None, app.dim), app.name
        del model
        keras.backend.clear_session()


def test_resnet50_fingerprints_are_what_they_always_were(tmp_path):
    """Existing nightly roots reuse rows only while the fingerprint is the same string."""
    weights = tmp_path / "w.weights.h5"
    weights.write_bytes(b"one")
    assert ModelConfig().fingerprint() == (
        "resnet50-notop/avg/224x224/squash/caffe-bgr/fp32/imagenet-md5:4d473c1dd8becc155b73f8504c6f6626"
    )
    random = ModelConfig(weights="random")
    assert random.fingerprint() == "resnet50-notop/avg/224x224/squash/caffe-bgr/fp32/random-seed:0"
    odd = ModelConfig(weights="random", seed=3, pooling="max", image_size=64, resize="center-crop", precision="bf16")
    assert odd.fingerprint() == "resnet50-notop/max/64x64/center-crop/caffe-bgr/bf16/random-seed:3"
    assert ModelConfig(weights=str(weights), image_size=32).fingerprint() == (
        "resnet50-notop/avg/32x32/squash/caffe-bgr/fp32/sha256:7692c3ad3540bb80"
    )
    # A manifest written before --model existed rebuilds the same config.
    old = {"image_size": 32, "pooling": "avg", "weights": "random", "seed": 0, "resize": "squash", "precision": "fp32"}
    assert ModelConfig(**old) == ModelConfig(model="resnet50", image_size=32, weights="random")


def test_each_application_has_its_own_fingerprint_size_and_width():
    configs = [ModelConfig(model=name) for name in APPLICATIONS]
    assert len({c.fingerprint() for c in configs}) == len(APPLICATIONS)
    b1 = ModelConfig(model="efficientnetv2-b1")
    assert (b1.image_size, b1.dim, b1.weights) == (240, 1280, "imagenet")
    assert b1.fingerprint() == (
        "efficientnetv2-b1-notop/avg/240x240/squash/in-model/fp32/imagenet-md5:0e80663031ca32d657f9caa404b6ec37"
    )
    tiny = ModelConfig(model="convnext-tiny", image_size=64, weights="random", seed=5)
    assert tiny.fingerprint() == "convnext-tiny-notop/avg/64x64/squash/in-model/fp32/random-seed:5"
    assert ModelConfig(**tiny.to_record()) == tiny


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "vgg16"], "model must be one of resnet50, resnet101"),
        (["--model", "convnext-tiny", "--image-size", "16"], "image_size must be >= 32 (convnext-tiny"),
        (["--layer", "avg_pool"], "--layer picks a layer of a saved model"),
        (["--preprocess", "resnet50"], "--preprocess applies to a saved model"),
        (["--model", "m.keras", "--weights", "random"], "--weights does not apply to a saved model"),
        (["--model", "m.keras", "--precision", "bf16"], "a saved model runs in the dtypes it was saved with"),
        (["--model", "nowhere/m.keras"], "model file 'nowhere/m.keras' does not exist"),
    ],
)
def test_model_options_that_cannot_work_are_one_clear_line(tmp_path, capsys, argv, message):
    (tmp_path / "in").mkdir()
    rc = main(["embed", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists()


def test_models_command_lists_every_application_from_the_table(capsys):
    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for app in APPLICATIONS.values():
        row = next(line.split() for line in lines if line.split()[:1] == [app.name])
        assert [int(row[-3]), int(row[-2])] == [app.dim, app.default_size], row
    assert main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["model"], r["dim"], r["default_size"]) for r in rows] == [
        (a.name, a.dim, a.default_size) for a in APPLICATIONS.values()
    ]
    assert [r["model"] for r in rows if r["default"]] == ["resnet50"]


def _pngs(folder, size: int) -> dict[str, np.ndarray]:
    """PNGs of exactly the model's input size: decoding gives back the very pixels written."""
    folder.mkdir()
    pixels = {}
    for name in ("astronaut", "coffee", "rocket"):
        img = photo((size, size), name)
        (folder / f"{name}.png").write_bytes(encode(img, "PNG"))
        pixels[f"{name}.png"] = np.asarray(img)
    return pixels


def by_hand(app_name: str, pixels: np.ndarray, *, size: int, pooling: str = "avg", seed: int = 0) -> np.ndarray:
    """The application built by hand, seeded as --weights random seeds it, on its own preprocess_input."""
    import keras

    app = APPLICATIONS[app_name]
    preprocess = importlib.import_module(f"keras.applications.{app.module}").preprocess_input
    keras.utils.set_random_seed(seed)
    model = getattr(keras.applications, app.keras_name)(
        include_top=False, pooling=pooling, weights=None, input_shape=(size, size, 3)
    )
    return model.predict(preprocess(pixels.astype("float32")), verbose=0)


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("model", "size", "stage"), [("efficientnetv2-b0", 64, "separate"), ("convnext-tiny", 32, "fused")]
)
def test_pipeline_vectors_equal_the_application_run_by_hand(tmp_path, model, size, stage):
    """Through the real pipeline; EfficientNetV2 through the separate decode stage (pixels shuffled)."""
    pixels = _pngs(tmp_path / "in", size)
    cfg = ModelConfig(model=model, image_size=size, weights="random", seed=0)
    out = tmp_path / "out"
    run_embed(EmbedConfig(input=str(tmp_path / "in"), output=str(out), model=cfg, batch_size=4, decode_stage=stage))
    m = manifest(out)
    assert m["embedding_dim"] == APPLICATIONS[model].dim and m["model"] == cfg.fingerprint()
    assert m["model_config"]["model"] == model and m["counts"]["embedded"] == 3
    vectors = embeddings_by_id(out)
    names = sorted(pixels)
    expected = by_hand(model, np.stack([pixels[n] for n in names]), size=size)
    for name, want in zip(names, expected, strict=True):
        assert vectors[name].shape == (APPLICATIONS[model].dim,)
        assert relative_error(vectors[name], want) < 1e-4, name


def test_the_gpu_decoders_device_pixels_feed_any_model():
    """nvImageCodec's batch decoder (on its CPU backend here) hands device tensors to EfficientNetV2 as to ResNet50."""
    pytest.importorskip("nvidia.nvimgcodec", reason="nvImageCodec is not installed (requirements-dev.txt brings it)")
    from pipeline import gpu_decode
    from pipeline.decode import decode_one
    from pipeline.embed import stack_pixels
    from pipeline.model import CompiledModel
    from pipeline.records import SourceImage

    images = [SourceImage(n, n, encode(photo((90, 60), n), "JPEG", quality=92)) for n in ("chelsea", "coffee")]
    decoder = gpu_decode.BatchDecoder(size=32, resize="squash", device="cpu", max_pixels=10**8)
    rows, counts = decoder.decode_counted(images)
    assert counts == {"gpu": 2}
    model = CompiledModel(ModelConfig(model="efficientnetv2-b0", image_size=32, weights="random"), batch_size=2)
    on_device = model(stack_pixels([row.pixels for row in rows]))
    host = model(np.stack([np.asarray(row.pixels) for row in rows]))
    assert on_device.shape == (2, 1280)
    np.testing.assert_allclose(on_device, host, rtol=1e-5, atol=1e-6)
    kwargs = dict(size=32, resize="squash", max_pixels=10**8, draft=True, thumbnail=False)
    cpu = model(np.stack([decode_one(i, kwargs).pixels for i in images]))
    assert relative_error(on_device, cpu) < 0.05  # decoders differ by a level or two (tests/test_closeness.py)
