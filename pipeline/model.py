"""The embedding model: built once per worker process, called on fixed-shape uint8 batches.

A Keras application (pipeline/applications.py; ResNet50 by default) without its classifier,
globally pooled, or a saved .keras model cut at a layer (pipeline/saved_model.py). Preprocessing
runs inside the graph: the application's own preprocess_input (for ResNet50, uint8 RGB -> float,
RGB->BGR, ImageNet mean subtraction, the "caffe" mode it was trained with; EfficientNetV2 and
ConvNeXt rescale inside the model), so 4x fewer bytes cross to the accelerator and no caller can
forget it.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from pipeline.applications import APPLICATIONS, Application
from pipeline.config import ModelConfig
from pipeline.errors import ModelFileError, WeightsUnavailableError
from pipeline.model_files import local_weights

log = logging.getLogger(__name__)

IMAGENET_NOTOP_FILE = APPLICATIONS["resnet50"].weights_file
IMAGENET_NOTOP_URL = APPLICATIONS["resnet50"].weights_url

_POLICIES = {"fp32": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}


def configure_tensorflow(*, intra_op_threads: int = 0, require_gpu: bool = False) -> None:
    """Thread and device settings that must happen before TensorFlow's runtime starts."""
    import tensorflow as tf

    if intra_op_threads > 0:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(intra_op_threads)
        except RuntimeError:  # runtime already initialised in this process: keep what it has
            log.debug("TensorFlow already initialised; intra-op threads unchanged")
    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        try:
            # Without growth TF grabs the whole card at start-up.
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:
            log.debug("GPU %s already initialised; memory growth unchanged", gpu.name)
    if require_gpu and not gpus:
        raise RuntimeError(
            "--require-gpu was given but TensorFlow sees no GPU on this worker "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}). "
            "Check the Dataflow worker_accelerator option, the install-nvidia-driver "
            "service option and that the container has the CUDA build of TensorFlow."
        )


def ensure_weights_available(cfg: ModelConfig) -> None:
    """Fail fast, before a job starts, when the weights cannot be had.

    For "imagenet" this fetches the application's file into Keras' cache (~/.keras/models), which
    local workers then read; a weights PATH or a saved model must be a readable file
    (`ModelConfig.resolve`, which reads it only when the config is not resolved yet). Raises
    WeightsUnavailableError.
    """
    if cfg.weights == "random":
        return
    if cfg.saved or cfg.weights != "imagenet":
        cfg.resolve()
        return
    from pipeline.quiet import import_tensorflow

    import_tensorflow()
    import keras

    app = cfg.application
    try:
        keras.utils.get_file(app.weights_file, app.weights_url, cache_subdir="models", file_hash=app.weights_hash)
    except Exception as exc:
        raise WeightsUnavailableError(_imagenet_message(app, exc)) from exc


def _imagenet_message(app: Application, exc: Exception) -> str:
    return (
        f"could not load the ImageNet weights for {app.keras_name} "
        f"({type(exc).__name__}: {exc}). Keras downloads them once into "
        "~/.keras/models/; this machine could not. Alternatives: "
        f"--weights PATH (a copy of {app.weights_file} "
        "or a .weights.h5 of the headless model), "
        + ("build the worker image with BAKE_IMAGENET_WEIGHTS=1, " if app.name == "resnet50" else "")
        + "or --weights random for tests only."
    )


def build_trunk(cfg: ModelConfig) -> Any:
    """The application (keras.applications) without its classifier, globally pooled, with the configured weights."""
    import keras

    app = cfg.application
    if app is None:
        raise ValueError(f"build_trunk builds an application; {cfg.model} is a saved model (build_model cuts it)")
    constructor = getattr(keras.applications, app.keras_name)
    shape = (cfg.image_size, cfg.image_size, 3)
    kwargs = dict(include_top=False, pooling=cfg.pooling, input_shape=shape)
    if cfg.weights == "random":
        keras.utils.set_random_seed(cfg.seed)
        return constructor(weights=None, **kwargs)
    if cfg.weights == "imagenet":
        try:
            return constructor(weights="imagenet", **kwargs)
        except Exception as exc:
            raise WeightsUnavailableError(_imagenet_message(app, exc)) from exc
    model = constructor(weights=None, **kwargs)
    with local_weights(cfg.weights) as path:
        try:
            model.load_weights(path)
        except Exception as exc:
            raise WeightsUnavailableError(
                f"weights file {cfg.weights!r} does not fit the headless {app.keras_name} ({type(exc).__name__}: {exc})"
            ) from exc
    return model


def _preprocessing(name: str) -> Any:
    """An application's own preprocess_input (float32 RGB 0-255 in); None for "none"."""
    if name == "none":
        return None
    import importlib

    return importlib.import_module(f"keras.applications.{APPLICATIONS[name].module}").preprocess_input


def _saved_features(cfg: ModelConfig) -> Any:
    """float32 pixels -> the vector of a saved model's layer, pooled by --pooling where it is a feature map."""
    import keras

    from pipeline.saved_model import cut_saved_model, load_saved_model

    fn, cut = cut_saved_model(load_saved_model(cfg.model), cfg.model, cfg.layer, cfg.image_size)
    if cut.rank == 2:
        return fn
    pool = (keras.layers.GlobalAveragePooling2D if cfg.pooling == "avg" else keras.layers.GlobalMaxPooling2D)(
        name=f"embedpipe_{cfg.pooling}_pool"
    )
    return lambda x: pool(fn(x))


def build_model(cfg: ModelConfig) -> Any:
    """uint8 RGB (N, S, S, 3) -> float32 (N, D), preprocessing inside the graph.

    Raises:
        ModelFileError: the model gives vectors of another width than its config names (a saved
            model changed under the same path after the config was resolved, or a wrong table row).
    """
    import keras

    cfg = cfg.resolve()  # a saved model's size, layer and width come from its file
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(_POLICIES[cfg.precision])
    try:
        pixels = keras.Input(shape=(cfg.image_size, cfg.image_size, 3), dtype="uint8", name="pixels")
        if cfg.saved:
            preprocess, name = _preprocessing(cfg.preprocess), "saved_model_uint8"
        else:
            preprocess, name = _preprocessing(cfg.model), f"{cfg.model.replace('-', '_')}_notop_uint8"
        # ResNet50's layer keeps the name it always had.
        label = "caffe_preprocess" if cfg.model == "resnet50" else "preprocess"
        if preprocess is None:
            x = keras.layers.Lambda(lambda t: keras.ops.cast(t, "float32"), name=label)(pixels)
        else:
            x = keras.layers.Lambda(lambda t: preprocess(keras.ops.cast(t, "float32")), name=label)(pixels)
        features = _saved_features(cfg)(x) if cfg.saved else build_trunk(cfg)(x)
        features = keras.layers.Activation("linear", dtype="float32", name="to_float32")(features)
        model = keras.Model(pixels, features, name=name)
    finally:
        keras.config.set_dtype_policy(previous)
    if tuple(model.output.shape[1:]) != (cfg.dim,):
        raise ModelFileError(
            f"{cfg.model} gives vectors of shape {tuple(model.output.shape[1:])}, but its config names {cfg.dim}-d "
            "ones; if the file changed since the run started, start it again"
        )
    return model


# XLA on CPU measured (fp32, this repo's benchmarks): +8% img/s at 224x224 batch 32,
# but 9x slower at 64x64 batch 8, so auto only turns it on for full-size inputs.
XLA_MIN_IMAGE_SIZE = 224
XLA_MIN_BATCH = 16


def use_xla(cfg: ModelConfig, batch_size: int) -> bool:
    """Whether to compile with XLA: as configured, or (auto) where it measured faster.

    Auto: on for CPU-only workers at full-size inputs (see the constants above); off on
    GPUs until measured there (XLA on GPU also needs ptxas from the CUDA toolkit).
    """
    if cfg.jit is not None:
        return cfg.jit
    if cfg.image_size < XLA_MIN_IMAGE_SIZE or batch_size < XLA_MIN_BATCH:
        return False
    import tensorflow as tf

    return not tf.config.list_physical_devices("GPU")


class CompiledModel:
    """A model plus a traced inference function of one fixed batch shape.

    Every call has the same shape (partial batches are padded), so the graph is
    traced once; results come back to numpy in one transfer per batch.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int) -> None:
        import tensorflow as tf

        cfg = cfg.resolve()  # a saved model's input size is read from its file
        self.cfg = cfg
        self.batch_size = batch_size
        self.keras_model = build_model(cfg)
        spec = tf.TensorSpec((batch_size, cfg.image_size, cfg.image_size, 3), tf.uint8)
        model = self.keras_model
        self.jit = use_xla(cfg, batch_size)
        self._fn = tf.function(lambda x: model(x, training=False), input_signature=[spec], jit_compile=self.jit)
        self.traces = 0

    def __call__(self, pixels: Any) -> np.ndarray:
        """Embed up to `batch_size` images (uint8, N x S x S x 3) -> float32 (N, D).

        `pixels` is numpy, or a TensorFlow tensor already on the device (the GPU decoder's
        output): that one is padded and fed where it is, with no copy through the host.
        """
        n = int(pixels.shape[0])
        if n > self.batch_size:
            raise ValueError(f"batch of {n} exceeds the compiled batch size {self.batch_size}")
        if isinstance(pixels, np.ndarray):
            if n < self.batch_size:
                pad = np.zeros((self.batch_size - n, *pixels.shape[1:]), dtype=np.uint8)
                pixels = np.concatenate([pixels, pad])
        elif n < self.batch_size:
            import tensorflow as tf

            pixels = tf.pad(pixels, [[0, self.batch_size - n], [0, 0], [0, 0], [0, 0]])
        out = self._fn(pixels).numpy()
        return np.ascontiguousarray(out[:n], dtype=np.float32)

    def trace_count(self) -> int:
        """How many graphs were traced (1 when shapes were kept fixed)."""
        return self._fn.experimental_get_tracing_count()
