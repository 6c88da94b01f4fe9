"""Device tensors of decoded images: CUDA stream synchronisation, DLPack into the Keras backend, batches.

Used by the GPU decoder (its images stay on the device) and by the embed stage, which stacks
per-image pixels into one batch where they are. numpy in, numpy out where nothing is on a device.
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Sequence
from typing import Any

import numpy as np


@functools.lru_cache(maxsize=1)
def _cudart() -> Any:
    names = ("libcudart.so", "libcudart.so.13", "libcudart.so.12")
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    try:  # the pip wheels' layouts: nvidia/cuda_runtime/lib (CUDA 12), nvidia/cu13/lib (CUDA 13)
        import nvidia

        for root in nvidia.__path__:
            for sub in ("cuda_runtime/lib", "cu13/lib", "cu12/lib"):
                for name in names[1:]:
                    path = os.path.join(root, sub, name)
                    if os.path.exists(path):
                        return ctypes.CDLL(path)
    except (ImportError, OSError):
        pass
    return None


def device_synchronize() -> None:
    """Wait for all work on the current CUDA device (timing); a no-op without libcudart."""
    lib = _cudart()
    if lib is not None:
        lib.cudaDeviceSynchronize()


def _wait_for(image) -> None:
    """Block until nvImageCodec's work on `image` is done (for consumers that take no stream)."""
    lib = _cudart()
    if lib is None:
        raise RuntimeError("libcudart not found: cannot synchronise nvImageCodec's stream for TensorFlow")
    status = lib.cudaStreamSynchronize(ctypes.c_void_p(image.cuda_stream))
    if status != 0:
        raise RuntimeError(f"cudaStreamSynchronize failed with CUDA error {status}")


def to_backend(image, backend: str, host_kind) -> Any:
    """An nvImageCodec Image -> tensor of the Keras backend, without a copy where the device allows."""
    if image.buffer_kind == host_kind:
        from keras import ops

        return ops.convert_to_tensor(np.asarray(image))
    if backend == "jax":
        import jax.dlpack

        try:
            return jax.dlpack.from_dlpack(image)  # __dlpack__ with JAX's stream: ordered after the decode
        except TypeError:  # a JAX that still takes capsules only
            _wait_for(image)
            return jax.dlpack.from_dlpack(image.to_dlpack())
    if backend == "torch":
        import torch

        return torch.from_dlpack(image)
    import tensorflow as tf

    _wait_for(image)  # TensorFlow's DLPack import passes no stream to order against
    return tf.experimental.dlpack.from_dlpack(image.to_dlpack())


def stack(pixels: Sequence[Any], rows: int | None = None) -> Any:
    """Per-image uint8 (S, S, 3) -> one (N, S, S, 3) batch, zero-padded to `rows` images.

    All numpy: a numpy batch. Otherwise a tensor of the Keras backend, built on its device
    (numpy images, from the CPU fallback, are copied there).
    """
    n = len(pixels)
    rows = rows or n
    if all(isinstance(p, np.ndarray) for p in pixels):
        batch = np.stack(pixels)
        if rows > n:
            batch = np.concatenate([batch, np.zeros((rows - n, *batch.shape[1:]), np.uint8)])
        return batch
    from keras import ops

    items = [ops.convert_to_tensor(p) for p in pixels]
    if rows > n:
        items += [ops.zeros(tuple(items[0].shape), dtype="uint8")] * (rows - n)
    return ops.stack(items)
