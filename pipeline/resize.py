"""Pillow's resize as separable weights: computed on the host, applied on any Keras backend's device.

`imaging._resize` scales with Pillow's BILINEAR filter (an antialiased triangle whose support
grows with the reduction) after a box `reduce` by an integer factor (`reducing_gap=3.0`). Both
are linear and act on rows and columns separately, so an image R (h, w, 3) resized to (P, Q) is
`A @ R @ B.T` per channel, with A (P, h) and B (Q, w). This module computes A and B exactly as
Pillow's `precompute_coeffs` and `ImagingReduce` define them (in float64; Pillow rounds to
uint8 after each pass, so results differ from Pillow's by a level or two), folds in the EXIF
orientation and the center-crop, and applies them with `keras.ops` on whatever device holds
the decoded pixels.

The weights are banded (each output pixel reads about 2 x scale inputs), so they travel as a
start index and a short row of coefficients per output pixel (kilobytes, not the megabytes of
the dense matrix) and are expanded on the device. Backends that compile per input shape (JAX)
get the pixels padded to a size bucket, so that the number of compiled programs stays bounded
whatever sizes the corpus holds.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import numpy as np

RESIZE_REDUCING_GAP = 3.0  # what imaging._resize passes to Image.resize
THUMBNAIL_REDUCING_GAP = 2.0  # Image.thumbnail's default
# Bucket sizes: 2 per octave (64, 96, 128, 192, ...). Padding costs at most 50% per axis
# (25% on average) of a cheap step; 4 per octave would make 4x as many programs to compile.
BUCKET_STEPS = (2, 3)
BUCKET_MIN = 64

# EXIF orientation -> (transposed, raw rows reversed, raw columns reversed): the oriented image
# O is R with those axes reversed, then transposed. Checked against Image.transpose in the tests.
_ORIENT = {
    1: (False, False, False),
    2: (False, False, True),
    3: (False, True, True),
    4: (False, True, False),
    5: (True, False, False),
    6: (True, True, False),
    7: (True, True, True),
    8: (True, False, True),
}


@dataclasses.dataclass(frozen=True)
class Band:
    """Weights of one axis: output i = sum_k coef[i, k] * input[start[i] + k]."""

    start: np.ndarray  # int32 (P,)
    coef: np.ndarray  # float32 (P, K); zeros past each row's band

    def dense(self, length: int) -> np.ndarray:
        """The (P, length) matrix (tests and host-side reference)."""
        out = np.zeros((len(self.start), length), np.float64)
        for i, (s, row) in enumerate(zip(self.start, self.coef, strict=True)):
            k = min(len(row), length - s)
            out[i, s : s + k] += row[:k]
        return out


@dataclasses.dataclass(frozen=True)
class Plan:
    """How to turn one raw decoded image (h, w, 3) into the oriented, resized (P, Q, 3) output.

    rows acts on the raw image's rows, cols on its columns; `transpose` swaps the result's
    axes (EXIF orientations 5-8). `out` is the oriented output size (P, Q) before any padding.
    """

    height: int
    width: int
    rows: Band
    cols: Band
    transpose: bool
    out: tuple[int, int]


def _triangle(in_size: int, in0: float, in1: float, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pillow's precompute_coeffs for the BILINEAR filter: (start (P,), coef (P, K))."""
    scale = (in1 - in0) / out_size
    filterscale = max(scale, 1.0)
    support = 1.0 * filterscale  # the triangle's support is 1
    ksize = math.ceil(support) * 2 + 1
    centers = in0 + (np.arange(out_size) + 0.5) * scale
    # C casts to int truncate towards zero; both are clamped at 0 right after.
    xmin = np.maximum(np.trunc(centers - support + 0.5).astype(np.int64), 0)
    xmax = np.minimum(np.trunc(centers + support + 0.5).astype(np.int64), in_size)
    k = np.arange(ksize)
    x = xmin[:, None] + k[None, :]
    w = np.maximum(0.0, 1.0 - np.abs((x - centers[:, None] + 0.5) / filterscale))
    w[x >= xmax[:, None]] = 0.0
    total = w.sum(axis=1, keepdims=True)
    w = np.divide(w, total, out=np.zeros_like(w), where=total != 0)
    return xmin, w


def axis_band(in_size: int, out_size: int, reducing_gap: float | None) -> Band:
    """Weights of Image.resize along one axis, reduce step included (full box, no crop)."""
    if in_size == out_size:
        return Band(np.arange(out_size, dtype=np.int32), np.ones((out_size, 1), np.float32))
    factor = (int(in_size / out_size / reducing_gap) or 1) if reducing_gap else 1
    if factor == 1:
        start, coef = _triangle(in_size, 0.0, float(in_size), out_size)
        return Band(start.astype(np.int32), coef.astype(np.float32))
    # Image.reduce: each reduced pixel is the mean of `factor` inputs (fewer in the last one);
    # the triangle then reads the reduced image over the box (0, in_size / factor).
    reduced = -(-in_size // factor)
    start_r, coef_r = _triangle(reduced, 0.0, in_size / factor, out_size)
    j = start_r[:, None] + np.arange(coef_r.shape[1])[None, :]  # reduced index of each coefficient
    count = np.clip(in_size - j * factor, 0, factor)  # inputs averaged into reduced pixel j
    per_input = np.divide(coef_r, count, out=np.zeros_like(coef_r), where=count > 0)
    t = np.arange(factor)
    valid = (j[:, :, None] * factor + t[None, None, :]) < in_size
    coef = (per_input[:, :, None] * valid).reshape(len(start_r), -1)
    return Band((start_r * factor).astype(np.int32), coef.astype(np.float32))


def _crop(band: Band, offset: int, size: int) -> Band:
    return Band(band.start[offset : offset + size], band.coef[offset : offset + size])


def _reverse(band: Band, length: int) -> Band:
    """The weights for the same output read from the input reversed (index j -> length-1-j)."""
    k = band.coef.shape[1]
    start = length - band.start.astype(np.int64) - k
    coef = band.coef[:, ::-1]
    # Rows whose padded band ran past the end now start below 0: those leading coefficients
    # are zeros, so rotate them to the back.
    shift = np.maximum(-start, 0)
    idx = (np.arange(k)[None, :] + shift[:, None]) % k
    return Band(np.maximum(start, 0).astype(np.int32), np.take_along_axis(coef, idx, axis=1))


def orientation_transform(orientation: int) -> tuple[bool, bool, bool]:
    """(transposed, rows reversed, columns reversed) of an EXIF orientation (1 when unknown)."""
    return _ORIENT.get(orientation, _ORIENT[1])


def plan(
    width: int, height: int, orientation: int, *, size: int, mode: str, reducing_gap: float = RESIZE_REDUCING_GAP
) -> Plan:
    """The weights that imaging._resize applies to the image as oriented, mapped onto the raw image.

    width, height: the raw (stored, unoriented) size. mode: "squash" or "center-crop".
    """
    transposed, flip_rows, flip_cols = orientation_transform(orientation)
    ow, oh = (height, width) if transposed else (width, height)  # oriented size
    if mode == "center-crop":
        scale = size / min(ow, oh)
        nw, nh = max(size, round(ow * scale)), max(size, round(oh * scale))
        by = _crop(axis_band(oh, nh, reducing_gap), (nh - size) // 2, size)
        bx = _crop(axis_band(ow, nw, reducing_gap), (nw - size) // 2, size)
    elif mode == "squash":
        by, bx = axis_band(oh, size, reducing_gap), axis_band(ow, size, reducing_gap)
    else:
        raise ValueError(f"resize mode must be 'squash' or 'center-crop'; got {mode!r}")
    return _raw_plan(width, height, by, bx, transposed, flip_rows, flip_cols, (size, size))


def thumbnail_size(width: int, height: int, box: int) -> tuple[int, int]:
    """(width, height) that Image.thumbnail((box, box)) gives an image of this oriented size."""
    if box >= width and box >= height:
        return width, height
    aspect = width / height
    x, y = box, box
    if x / y >= aspect:
        x = max(min(math.floor(y * aspect), math.ceil(y * aspect), key=lambda n: abs(aspect - n / y)), 1)
    else:
        y = max(min(math.floor(x / aspect), math.ceil(x / aspect), key=lambda n: abs(aspect - x / n) if n else 0), 1)
    return x, y


def thumbnail_plan(width: int, height: int, orientation: int, *, box: int) -> Plan:
    """The weights of Image.thumbnail((box, box), BILINEAR) on the oriented image."""
    transposed, flip_rows, flip_cols = orientation_transform(orientation)
    ow, oh = (height, width) if transposed else (width, height)
    tw, th = thumbnail_size(ow, oh, box)
    by = axis_band(oh, th, THUMBNAIL_REDUCING_GAP)
    bx = axis_band(ow, tw, THUMBNAIL_REDUCING_GAP)
    return _raw_plan(width, height, by, bx, transposed, flip_rows, flip_cols, (th, tw))


def _raw_plan(
    width: int,
    height: int,
    by: Band,
    bx: Band,
    transposed: bool,
    flip_rows: bool,
    flip_cols: bool,
    out: tuple[int, int],
) -> Plan:
    # Oriented O = transpose?(R with reversed axes). For a transposed O, O's columns are R's rows.
    rows, cols = (bx, by) if transposed else (by, bx)
    if flip_rows:
        rows = _reverse(rows, height)
    if flip_cols:
        cols = _reverse(cols, width)
    return Plan(height, width, rows, cols, transposed, out)


def apply_numpy(pixels: np.ndarray, p: Plan) -> np.ndarray:
    """Host reference of what the device computes: raw uint8 (h, w, 3) -> oriented uint8 output."""
    a = p.rows.dense(p.height)
    b = p.cols.dense(p.width)
    t = np.tensordot(a, pixels.astype(np.float64), axes=(1, 0))  # (P, w, 3)
    y = np.einsum("pwc,qw->pqc", t, b)
    if p.transpose:
        y = y.transpose(1, 0, 2)
    return np.clip(np.floor(y + 0.5), 0, 255).astype(np.uint8)


def bucket(n: int) -> int:
    """The smallest bucket size >= n: 64, 96, 128, 192, 256, 384, ..."""
    if n <= BUCKET_MIN:
        return BUCKET_MIN
    octave = 1 << (n - 1).bit_length() - 2  # the largest power of two below n, halved
    for step in (*BUCKET_STEPS, 4):
        if step * octave >= n:
            return step * octave
    raise AssertionError("unreachable")


@functools.lru_cache(maxsize=1024)
def band_width(bucket_len: int, out: int, reducing_gap: float) -> int:
    """Coefficients per row that cover every input length of this bucket resized to `out` (or more).

    One width per bucket, so one program per bucket: the largest `axis_band` width over the
    lengths that fall in the bucket (a longer output, as center-crop's, only narrows the band).
    """
    widest = 1
    for n in range(max(1, bucket_len * 2 // 3 - 1), bucket_len + 1):
        factor = max(int(n / out / reducing_gap), 1)
        support = max(n / factor / out, 1.0)
        widest = max(widest, (math.ceil(support) * 2 + 1) * factor)
    return widest


def _pow2(k: int) -> int:
    return max(4, 1 << (k - 1).bit_length())


def padded(band: Band, width: int, rows: int) -> Band:
    """The band with `width` coefficients per row and `rows` rows (extra rows all zero)."""
    coef = np.pad(band.coef, ((0, 0), (0, width - band.coef.shape[1])))
    extra = rows - len(band.start)
    return Band(np.pad(band.start, (0, extra)), np.pad(coef, ((0, extra), (0, 0))))


class DeviceResizer:
    """Applies plans with keras.ops on the current Keras backend's device.

    One compiled program per (padded input size, band width, output size): on JAX, inputs are
    padded to `bucket` sizes first; TensorFlow (tf.function, shapes relaxed after a retrace) and
    PyTorch (eager) do not specialise on shapes, so they get the pixels as they are.
    """

    def __init__(self, *, buckets: bool | None = None) -> None:
        """buckets: pad inputs to bucket sizes (default: on the backends that compile per shape)."""
        import keras

        self.backend = keras.backend.backend()
        self.buckets = self.backend == "jax" if buckets is None else buckets
        self.shapes: set[tuple] = set()  # distinct resize shapes: one program each on JAX
        self.padded: set[tuple[int, int]] = set()  # distinct raw sizes padded: one small pad program each on JAX
        band = [((None,), "int32"), ((None, None), "float32")]  # start, coef
        resize_sig = [((None, None, 3), "uint8"), *band, *band]
        self._fn = self._compile(self._resize, resize_sig)
        self._transpose = self._compile(self._swap, [((None, None, 3), "uint8")])

    def _compile(self, fn, signature: list[tuple[tuple, str]]):
        if self.backend == "jax":
            import jax

            return jax.jit(fn)
        if self.backend == "tensorflow":
            import tensorflow as tf

            # Unknown dims: one trace serves every size (TensorFlow's kernels are not shape-specialised).
            return tf.function(fn, input_signature=[tf.TensorSpec(shape, dtype) for shape, dtype in signature])
        return fn

    def programs(self) -> int:
        """Resize programs compiled so far: jax.jit cache entries, or tf.function traces (0: eager)."""
        if self.backend == "jax":
            return self._fn._cache_size() + self._transpose._cache_size()
        if self.backend == "tensorflow":
            return self._fn.experimental_get_tracing_count() + self._transpose.experimental_get_tracing_count()
        return 0

    @staticmethod
    def _expand(start, coef, length: int):
        from keras import ops

        p, k = ops.shape(coef)[0], ops.shape(coef)[1]  # static on JAX, dynamic under tf.function
        cols = ops.minimum(ops.expand_dims(start, 1) + ops.expand_dims(ops.arange(k, dtype="int32"), 0), length - 1)
        rows = ops.broadcast_to(ops.expand_dims(ops.arange(p, dtype="int32"), 1), (p, k))
        idx = ops.stack([ops.reshape(rows, (-1,)), ops.reshape(cols, (-1,))], axis=1)
        # scatter adds duplicates: the zero coefficients clamped onto the last column add nothing.
        return ops.scatter(idx, ops.reshape(coef, (-1,)), (p, length))

    @classmethod
    def _resize(cls, pixels, r_start, r_coef, c_start, c_coef):
        from keras import ops

        shape = ops.shape(pixels)  # dynamic under tf.function once shapes are relaxed
        h, w = shape[0], shape[1]
        a = cls._expand(r_start, r_coef, h)
        b = cls._expand(c_start, c_coef, w)
        x = ops.cast(pixels, "float32")
        t = ops.einsum("ph,hwc->pwc", a, x)
        y = ops.einsum("pwc,qw->pqc", t, b)
        return ops.cast(ops.clip(ops.floor(y + 0.5), 0.0, 255.0), "uint8")

    @staticmethod
    def _swap(y):
        from keras import ops

        return ops.transpose(y, (1, 0, 2))

    def __call__(self, pixels: Any, p: Plan, *, out_rows: int) -> Any:
        """Raw uint8 (h, w, 3) backend tensor -> uint8 (out_rows, out_rows, 3) backend tensor.

        The plan's output (P, Q) sits in the top-left corner; the rest is zero (thumbnails). With
        buckets, `pixels` may also be the image in the corner of a zeroed (bucket(h), bucket(w), 3).
        """
        from keras import ops

        h, w = p.height, p.width
        if self.buckets:
            hb, wb = bucket(h), bucket(w)
            if (hb, wb) != tuple(pixels.shape[:2]):  # not decoded into a bucket-sized buffer already
                self.padded.add((h, w))
                pixels = ops.pad(pixels, ((0, hb - h), (0, wb - w), (0, 0)))
            if p.out == (out_rows, out_rows):  # the model input: one band width per bucket
                kr = band_width(hb, out_rows, RESIZE_REDUCING_GAP)
                kc = band_width(wb, out_rows, RESIZE_REDUCING_GAP)
            else:  # a thumbnail, smaller than its canvas: widths rounded up to a power of two
                kr, kc = _pow2(p.rows.coef.shape[1]), _pow2(p.cols.coef.shape[1])
            kr, kc = max(kr, p.rows.coef.shape[1]), max(kc, p.cols.coef.shape[1])
        else:
            hb, wb = h, w
            kr, kc = p.rows.coef.shape[1], p.cols.coef.shape[1]
        rows = padded(p.rows, kr, out_rows)
        cols = padded(p.cols, kc, out_rows)
        self.shapes.add((hb, wb, rows.coef.shape[1], cols.coef.shape[1], out_rows))
        y = self._fn(
            pixels,
            ops.convert_to_tensor(rows.start),
            ops.convert_to_tensor(rows.coef),
            ops.convert_to_tensor(cols.start),
            ops.convert_to_tensor(cols.coef),
        )
        return self._transpose(y) if p.transpose else y
