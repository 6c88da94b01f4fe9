"""The headless ResNet50: built once per worker process, called on fixed-shape uint8 batches.

Preprocessing (uint8 RGB -> float, RGB->BGR, ImageNet mean subtraction, the
"caffe" mode Keras' ResNet50 was trained with) runs inside the graph, so 4x fewer
bytes cross to the accelerator and no caller can forget it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator
from typing import Any

import numpy as np

from pipeline.config import IMAGENET_NOTOP_MD5, ModelConfig, missing_weights_message
from pipeline.errors import WeightsUnavailableError

log = logging.getLogger(__name__)

IMAGENET_NOTOP_FILE = "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
IMAGENET_NOTOP_URL = "https://storage.googleapis.com/tensorflow/keras-applications/resnet/" + IMAGENET_NOTOP_FILE

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


@contextlib.contextmanager
def local_weights(weights: str) -> Iterator[str]:
    """A local path of a weights file (any Beam filesystem) for the duration of the block.

    A local file is used where it is. A remote one is copied to a temporary file, which is
    deleted when the block ends: Keras has read the weights into the model by then, so a
    worker process holds no copy afterwards and a worker killed later leaves none behind.
    Raises WeightsUnavailableError for a missing, unreadable or non-regular file.
    """
    from apache_beam.io.filesystems import FileSystems

    from pipeline.storage import NotRegularFileError, check_regular, open_regular

    if os.path.exists(weights):
        try:
            check_regular(weights)  # a FIFO or device would hang or never end the load
        except NotRegularFileError as exc:
            raise WeightsUnavailableError(f"weights file {weights!r}: {exc}") from exc
        yield weights
        return
    try:
        exists = FileSystems.exists(weights)
    except Exception as exc:  # unknown scheme, missing credentials, ...
        raise WeightsUnavailableError(f"cannot access weights file {weights!r}: {exc}") from exc
    if not exists:
        raise WeightsUnavailableError(missing_weights_message(weights))
    suffix = ".weights.h5" if weights.endswith(".weights.h5") else os.path.splitext(weights)[1]
    fd, local = tempfile.mkstemp(suffix=suffix, prefix="embedpipe-weights-")
    try:
        with os.fdopen(fd, "wb") as out, open_regular(weights) as src:
            for chunk in iter(lambda: src.read(1 << 22), b""):
                out.write(chunk)
        yield local
    finally:
        with contextlib.suppress(OSError):
            os.remove(local)


def ensure_weights_available(cfg: ModelConfig) -> None:
    """Fail fast, before a job starts, when the weights cannot be had.

    For "imagenet" this fetches the file into Keras' cache (~/.keras/models), which
    local workers then read; a PATH must be a readable file (`ModelConfig.resolve`, which
    reads it only when the config is not resolved yet). Raises WeightsUnavailableError.
    """
    if cfg.weights == "random":
        return
    if cfg.weights != "imagenet":
        cfg.resolve()
        return
    from pipeline.quiet import import_tensorflow

    import_tensorflow()
    import keras

    try:
        keras.utils.get_file(
            IMAGENET_NOTOP_FILE, IMAGENET_NOTOP_URL, cache_subdir="models", file_hash=IMAGENET_NOTOP_MD5
        )
    except Exception as exc:
        raise WeightsUnavailableError(_imagenet_message(exc)) from exc


def _imagenet_message(exc: Exception) -> str:
    return (
        "could not load the ImageNet weights for ResNet50 "
        f"({type(exc).__name__}: {exc}). Keras downloads them once into "
        "~/.keras/models/; this machine could not. Alternatives: "
        "--weights PATH (a copy of resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5 "
        "or a .weights.h5 of the headless model), build the worker image with "
        "BAKE_IMAGENET_WEIGHTS=1, or --weights random for tests only."
    )


def build_trunk(cfg: ModelConfig) -> Any:
    """keras.applications.ResNet50 without its classifier, with the configured weights."""
    import keras

    shape = (cfg.image_size, cfg.image_size, 3)
    kwargs = dict(include_top=False, pooling=cfg.pooling, input_shape=shape)
    if cfg.weights == "random":
        keras.utils.set_random_seed(cfg.seed)
        return keras.applications.ResNet50(weights=None, **kwargs)
    if cfg.weights == "imagenet":
        try:
            return keras.applications.ResNet50(weights="imagenet", **kwargs)
        except Exception as exc:
            raise WeightsUnavailableError(_imagenet_message(exc)) from exc
    model = keras.applications.ResNet50(weights=None, **kwargs)
    with local_weights(cfg.weights) as path:
        try:
            model.load_weights(path)
        except Exception as exc:
            raise WeightsUnavailableError(
                f"weights file {cfg.weights!r} does not fit the headless ResNet50 ({type(exc).__name__}: {exc})"
            ) from exc
    return model


def build_model(cfg: ModelConfig) -> Any:
    """uint8 RGB (N, S, S, 3) -> float32 (N, 2048), preprocessing inside the graph."""
    import keras
    from keras.applications.resnet50 import preprocess_input

    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(_POLICIES[cfg.precision])
    try:
        trunk = build_trunk(cfg)
        pixels = keras.Input(shape=(cfg.image_size, cfg.image_size, 3), dtype="uint8", name="pixels")
        x = keras.layers.Lambda(lambda t: preprocess_input(keras.ops.cast(t, "float32")), name="caffe_preprocess")(
            pixels
        )
        features = trunk(x)
        features = keras.layers.Activation("linear", dtype="float32", name="to_float32")(features)
        return keras.Model(pixels, features, name="resnet50_notop_uint8")
    finally:
        keras.config.set_dtype_policy(previous)


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

        self.cfg = cfg
        self.batch_size = batch_size
        self.keras_model = build_model(cfg)
        spec = tf.TensorSpec((batch_size, cfg.image_size, cfg.image_size, 3), tf.uint8)
        model = self.keras_model
        self.jit = use_xla(cfg, batch_size)
        self._fn = tf.function(lambda x: model(x, training=False), input_signature=[spec], jit_compile=self.jit)
        self.traces = 0

    def __call__(self, pixels: Any) -> np.ndarray:
        """Embed up to `batch_size` images (uint8, N x S x S x 3) -> float32 (N, 2048).

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
