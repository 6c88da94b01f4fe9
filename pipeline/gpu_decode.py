"""Batch JPEG decoding with NVIDIA nvImageCodec, resized on the device, with a per-image CPU fallback.

`BatchDecoder.decode(images)` gives, per SourceImage and in order, a DecodedImage whose pixels
stay on the device (a tensor of the Keras backend) or an error row, with the CPU path's ids,
sha256, sizes, reasons and messages. Only JPEGs that nvImageCodec decodes under the CPU path's
rules go to it (`route` in gpu_routing.py, from the header alone); every other image, and every image it fails
on, is decoded by `decode_one` (the CPU path), alone. `device="cpu"` runs the same code on
nvImageCodec's CPU backend: how the tests run it without a GPU. Device tensors (DLPack, stream
sync, batches) are in device_tensors.py. Design: docs/GPU.md.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import hashlib
import io
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image

from pipeline import records, resize
from pipeline.device_tensors import to_backend
from pipeline.gpu_routing import Route, route
from pipeline.imaging import THUMBNAIL_SIZE, DecodeError, decode_image
from pipeline.records import DecodedImage, SourceImage

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "install nvImageCodec and nvJPEG for the worker's CUDA: "
    "pip install nvidia-nvimgcodec-cu12 nvidia-nvjpeg-cu12 (CUDA 12) or the -cu13 wheels (CUDA 13)"
)


def _nvimgcodec():
    """The nvImageCodec module (ImportError when it is not installed)."""
    # Its own log lines (a warning per image it cannot decode) repeat what our fallback
    # counters say; PYNVIMGCODEC_VERBOSITY=2 brings them back.
    os.environ.setdefault("PYNVIMGCODEC_VERBOSITY", "0")
    from nvidia import nvimgcodec

    return nvimgcodec


def _probe_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 90)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _gpu_backends(nv) -> list:
    # No CPU backend: what the GPU cannot decode falls back to our CPU path, with its rules.
    return [nv.Backend(nv.HW_GPU_ONLY), nv.Backend(nv.GPU_ONLY), nv.Backend(nv.HYBRID_CPU_GPU)]


@functools.lru_cache(maxsize=1)
def gpu_decode_status() -> tuple[bool, str]:
    """(available, why): nvImageCodec imports, a CUDA device is visible, and it decodes a JPEG there."""
    try:
        nv = _nvimgcodec()
    except ImportError as exc:
        return False, f"nvImageCodec is not installed ({exc}); {INSTALL_HINT}"
    version = getattr(nv, "__version__", "?")
    try:
        decoder = nv.Decoder(backends=_gpu_backends(nv))
    except Exception as exc:  # no driver, no device, CUDA too old: all say "CUDA Runtime failure"
        return False, f"nvImageCodec {version} found no usable CUDA device ({type(exc).__name__}: {exc})"
    try:
        image = decoder.decode(nv.CodeStream(_probe_jpeg()))
    except Exception as exc:
        image, why = None, f"{type(exc).__name__}: {exc}"
    else:
        why = "no GPU decoder is registered"
    if image is None:
        return False, f"nvImageCodec {version} could not decode a JPEG on the GPU ({why}); {INSTALL_HINT}"
    if image.buffer_kind != nv.ImageBufferKind.STRIDED_DEVICE:
        return False, f"nvImageCodec {version} decoded the probe into host memory, not on the GPU"
    return True, f"nvImageCodec {version} decodes JPEGs on CUDA device {image.device_id}"


def decode_one(image: SourceImage, kwargs: dict) -> DecodedImage | dict:
    """The CPU path for one image: a DecodedImage, or an error row (never raises for bad input).

    kwargs: those of imaging.decode_image. Lives here, not in decode.py, so that it imports
    without Beam (the GPU check machine has none); decode.py re-exports it.
    """
    sha = hashlib.sha256(image.data).hexdigest()
    try:
        pixels, width, height, thumb = decode_image(image.data, **kwargs)
    except DecodeError as exc:
        return records.error_row(image.id, image.uri, "decode", exc.reason, str(exc), sha)
    return DecodedImage(image.id, image.uri, pixels, sha, width, height, image.meta, thumb, marker=image.marker)


class BatchDecoder:
    """JPEG batches -> DecodedImage (pixels on the device) or error rows, as the CPU path would.

    Args:
        size, resize, max_pixels, thumbnails: as `decode.DecodeImages`.
        draft: JPEG draft mode of the CPU fallback (the device decodes at full size).
        device: "gpu" (nvImageCodec's GPU decoders; raises if unavailable) or "cpu" (its CPU backend).
        pool: runs the host work (hashing, headers, CPU fallbacks) on these threads.
        nv_decoder: an object with nvImageCodec's `Decoder.decode(code_streams, params=)`, for tests.
    """

    def __init__(
        self,
        *,
        size: int,
        resize: str = "squash",
        max_pixels: int,
        thumbnails: bool = False,
        draft: bool = True,
        device: str = "gpu",
        pool: concurrent.futures.Executor | None = None,
        nv_decoder: Any = None,
    ) -> None:
        if device not in ("gpu", "cpu"):
            raise ValueError(f"device must be 'gpu' or 'cpu'; got {device!r}")
        try:
            nv = _nvimgcodec()
        except ImportError as exc:
            raise RuntimeError(f"GPU decoding needs nvImageCodec ({exc}); {INSTALL_HINT}") from exc
        import keras

        self._nv = nv
        self.size, self.resize, self.max_pixels, self.thumbnails = size, resize, max_pixels, thumbnails
        self.device = device
        self._cpu_kwargs = dict(size=size, resize=resize, max_pixels=max_pixels, draft=draft, thumbnail=thumbnails)
        self._pool = pool
        if nv_decoder is None:
            if device == "gpu":
                ok, why = gpu_decode_status()
                if not ok:
                    raise RuntimeError(f"decode on the GPU is not possible here: {why}")
                nv_decoder = nv.Decoder(backends=_gpu_backends(nv))
            else:
                nv_decoder = nv.Decoder(device_id=nv.NVIMGCODEC_DEVICE_CPU_ONLY, backends=[nv.Backend(nv.CPU_ONLY)])
        self._decoder = nv_decoder
        # Orientation is ours to apply (folded into the resize weights), exactly as the CPU path reads it.
        self._params = nv.DecodeParams(apply_exif_orientation=False, color_spec=nv.SRGB)
        self._host_kind = nv.ImageBufferKind.STRIDED_HOST
        self._backend = keras.backend.backend()
        self.resizer = _resizer()
        self.last_error: str | None = None  # the latest device-side failure, for reports
        self._canvas = self._canvas_allocator()

    def _map(self, fn: Callable, items: Sequence) -> list:
        if self._pool is None:
            return [fn(x) for x in items]
        return list(self._pool.map(fn, items))

    def _host_side(self, image: SourceImage) -> tuple[str, Route | str]:
        return hashlib.sha256(image.data).hexdigest(), route(image.data, self.max_pixels)

    def _cpu(self, image: SourceImage) -> DecodedImage | dict:
        return decode_one(image, self._cpu_kwargs)

    def decode(self, images: Sequence[SourceImage]) -> list[DecodedImage | dict]:
        """Per input, in order: a DecodedImage or an error row.

        Pixels are a Keras-backend tensor where the device decoded the image, numpy where the CPU path did.
        """
        return self.decode_counted(images)[0]

    def decode_counted(self, images: Sequence[SourceImage]) -> tuple[list[DecodedImage | dict], collections.Counter]:
        """`decode`, plus counts: "gpu" (decoded by nvImageCodec) and "cpu:<why>" per fallback."""
        counts: collections.Counter = collections.Counter()
        host = self._map(self._host_side, images)
        results: list[Any] = [None] * len(images)
        fallback: list[int] = []
        routed: list[int] = []
        for i, (_, r) in enumerate(host):
            if isinstance(r, Route):
                routed.append(i)
            else:
                fallback.append(i)
                counts[f"cpu:{r}"] += 1
        decoded = self._nv_decode([images[i].data for i in routed], [host[i][1] for i in routed])
        for i, (img, canvas) in zip(routed, decoded, strict=True):
            r = host[i][1]
            if img is None or tuple(img.shape[:2]) != (r.height, r.width) or img.shape[2] != 3:
                fallback.append(i)
                counts["cpu:nvimgcodec_failed"] += 1
                continue
            try:
                results[i] = self._finish(images[i], host[i][0], r, img, canvas)
                counts["gpu"] += 1
            except Exception as exc:  # a device-side failure costs this image its fast path, not its row
                why = self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("device resize failed for %s (%s); CPU path used", images[i].uri, why)
                fallback.append(i)
                counts["cpu:device_failed"] += 1
        for i, row in zip(fallback, self._map(self._cpu, [images[i] for i in fallback]), strict=True):
            results[i] = row
        return results, counts

    def _nv_decode(self, datas: list[bytes], routes: list[Route]) -> list[tuple[Any, Any]]:
        """(nvImageCodec image or None, the bucket canvas it was decoded into or None) per input."""
        if not datas:
            return []
        nv = self._nv
        streams = [nv.CodeStream(d) for d in datas]
        if self._canvas is not None:
            try:
                return self._decode_into_canvases(streams, routes)
            except Exception as exc:  # this decoder cannot write into our buffers: decode into its own
                self.last_error = f"decode into canvases: {type(exc).__name__}: {exc}"
                log.warning("nvImageCodec %s; it allocates its own buffers from now on", self.last_error)
                self._canvas = None
        try:
            return [(img, None) for img in self._decoder.decode(streams, params=self._params)]
        except Exception as exc:  # the whole batch failed (out of memory, ...): every image goes to the CPU path
            why = self.last_error = f"{type(exc).__name__}: {exc}"
            log.warning("nvImageCodec failed on a batch of %d (%s); CPU path used", len(datas), why)
            return [(None, None)] * len(datas)

    def _decode_into_canvases(self, streams: list, routes: list[Route]) -> list[tuple[Any, Any]]:
        """Decode each image into the top-left corner of a zeroed buffer of its bucket size.

        JAX compiles a program per input shape: padding a decoded image to its bucket would
        compile one per distinct image size. Decoded straight into bucket-sized buffers
        (nvImageCodec writes rows with a pitch), JAX sees bucket shapes only.
        """
        nv, (alloc, stream) = self._nv, self._canvas
        canvases = [alloc((resize.bucket(r.height), resize.bucket(r.width), 3)) for r in routes]
        views = [nv.as_image(c[: r.height, : r.width]) for c, r in zip(canvases, routes, strict=True)]
        out = self._decoder.decode(streams, images=views, params=self._params, cuda_stream=stream())
        return [(img, canvas if img is not None else None) for img, canvas in zip(out, canvases, strict=True)]

    def _canvas_allocator(self) -> tuple[Callable, Callable] | None:
        """(allocate zeroed uint8 buffers, the CUDA stream to order the decode on) where buckets apply."""
        if not self.resizer.buckets:
            return None
        if self.device == "cpu":
            return (lambda shape: np.zeros(shape, np.uint8)), (lambda: 0)
        try:
            import cupy
        except ImportError:  # JAX then pads on the device: one small program per distinct size
            return None
        return (lambda shape: cupy.zeros(shape, cupy.uint8)), (lambda: cupy.cuda.get_current_stream().ptr)

    def _finish(self, image: SourceImage, sha: str, r: Route, decoded, canvas) -> DecodedImage:
        if canvas is None:
            raw = to_backend(decoded, self._backend, self._host_kind)
        elif isinstance(canvas, np.ndarray):
            from keras import ops

            raw = ops.convert_to_tensor(canvas)
        else:
            import jax.dlpack

            raw = jax.dlpack.from_dlpack(canvas)  # CuPy orders JAX's stream after the decode
        p = resize.plan(r.width, r.height, r.orientation, size=self.size, mode=self.resize)
        pixels = self.resizer(raw, p, out_rows=self.size)
        thumb = None
        if self.thumbnails:
            tp = resize.thumbnail_plan(r.width, r.height, r.orientation, box=THUMBNAIL_SIZE)
            small = np.asarray(self.resizer(raw, tp, out_rows=THUMBNAIL_SIZE))[: tp.out[0], : tp.out[1]]
            buf = io.BytesIO()
            Image.fromarray(small).save(buf, format="JPEG", quality=80)
            thumb = buf.getvalue()
        width, height = r.oriented
        return DecodedImage(image.id, image.uri, pixels, sha, width, height, image.meta, thumb, marker=image.marker)


@functools.lru_cache(maxsize=1)
def _resizer() -> resize.DeviceResizer:
    """The process's DeviceResizer: one set of compiled programs per process."""
    return resize.DeviceResizer()
