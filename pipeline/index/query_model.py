"""Embedding query images with exactly the model an index was built from.

`index.json` records the fingerprint of every indexed vector and the `model_config`
that produced it. A query image is embedded only when that config rebuilds the same
fingerprint (same weights, pooling, size, preprocessing), and it is decoded the way
`embedpipe embed` decoded the corpus. The compiled model comes from
`pipeline.embed.load_model`, the process-wide cache the embed stage uses, so a
process that embeds and then queries with the same model and batch size builds it once.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from pipeline import reasons
from pipeline.config import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, ModelConfig
from pipeline.errors import UsageError
from pipeline.imaging import DecodeError, decode_image
from pipeline.storage import NotRegularFileError, TooLargeError, read_bounded, safe_text

log = logging.getLogger(__name__)


class ModelMismatchError(UsageError):
    """Query images cannot be embedded with the model the index was built from."""


class QueryImageError(UsageError):
    """A query image that cannot be embedded; `reason` is a code of pipeline.reasons."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class QueryModel:
    """The index's model, checked against its fingerprint and built on first use. Thread-safe."""

    def __init__(
        self,
        meta: dict,
        *,
        index_dir: str,
        thumbnails: bool,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        batch_size: int = 8,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        """
        Args:
            meta: the index's index.json (`model`, `model_config`).
            index_dir: named in error messages.
            thumbnails: whether the corpus was embedded with thumbnails (it sets the JPEG draft scale).
            max_pixels: query images with more pixels are refused.
            batch_size: images per model call.
            max_bytes: query image files (paths) with more bytes are refused.
        """
        self.meta = meta
        self.index_dir = index_dir
        self.thumbnails = thumbnails
        self.max_pixels = max_pixels
        self.max_bytes = max_bytes
        self.batch_size = batch_size
        self._lock = threading.Lock()
        self._holder: Any = None  # keeps the cached model alive for as long as this object
        self._check: tuple[ModelConfig | None, str | None] | None = None

    def config(self) -> ModelConfig:
        """The ModelConfig that rebuilds the index's model; ModelMismatchError if there is none."""
        if self._check is None:
            self._check = self._check_model()
        cfg, error = self._check
        if error is not None:
            raise ModelMismatchError(error)
        assert cfg is not None
        return cfg

    def error(self) -> str | None:
        """Why query images cannot be embedded, or None when they can."""
        try:
            self.config()
        except ModelMismatchError as exc:
            return str(exc)
        return None

    def _check_model(self) -> tuple[ModelConfig | None, str | None]:
        recorded = self.meta.get("model_config")
        fingerprint = self.meta["model"]
        if not recorded:
            return None, (
                f"the index at {self.index_dir} records no model_config (model {fingerprint}), so query images "
                "cannot be embedded with the same model; search by id or by vector instead, or rebuild the "
                "index from the output of `embedpipe embed` (its manifest.json records the model)"
            )
        try:
            # Resolved here, once: the weights file is hashed to check it is still the one the index was
            # built with (a digest stored beside the config would not say so), and the model is built
            # from this config without reading the file again to name it.
            fields = {k: v for k, v in recorded.items() if k not in ("weights_sha256", "model_sha256")}
            cfg = ModelConfig(**fields).resolve()
            rebuilt = cfg.fingerprint()
        except Exception as exc:  # bad field, missing weights file, ...
            return None, f"cannot rebuild the index's model from model_config {recorded}: {type(exc).__name__}: {exc}"
        if rebuilt != fingerprint:
            return None, (
                f"refusing to embed query images: the index was built from model {fingerprint}, but its "
                f"model_config rebuilds {rebuilt} (different weights file or settings); vectors of two models "
                "are not comparable"
            )
        return cfg, None

    def _model(self) -> Any:
        cfg = self.config()
        if self._holder is None:
            from pipeline.embed import load_model

            self._holder = load_model(cfg, self.batch_size)
        return self._holder.model

    def warm(self) -> None:
        """Build the model now (a few seconds) instead of on the first image query."""
        cfg = self.config()
        with self._lock:
            self._model()(np.zeros((1, cfg.image_size, cfg.image_size, 3), np.uint8))

    def decode(self, data: bytes, *, max_pixels: int | None = None) -> np.ndarray:
        """Image bytes -> model input pixels, decoded exactly as `embedpipe embed` decodes.

        Raises:
            QueryImageError: with a reason code (pipeline.reasons) for a bad image.
        """
        cfg = self.config()
        try:
            pixels, _, _, _ = decode_image(
                bytes(data),
                size=cfg.image_size,
                resize=cfg.resize,
                max_pixels=max_pixels or self.max_pixels,
                draft=True,
                # The JPEG draft scale depends on whether a thumbnail was made; match the embed run,
                # but never build the thumbnail itself (a full-size copy of the image, thrown away).
                thumbnail=False,
                draft_for_thumbnail=self.thumbnails,
            )
        except DecodeError as exc:
            raise QueryImageError(exc.reason, str(exc)) from exc
        return pixels

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 (N, S, S, 3) -> float32 (N, dim)."""
        with self._lock:  # one model call at a time: TF already uses every core
            model = self._model()
            return np.concatenate(
                [model(pixels[i : i + self.batch_size]) for i in range(0, len(pixels), self.batch_size)]
            )

    def pixels_of(self, images: Sequence[str | bytes], *, max_pixels: int | None = None) -> np.ndarray | None:
        """Read (paths on any Beam filesystem) and decode query images; None for no images.

        Raises:
            QueryImageError: naming the image (path or position) that cannot be read or decoded.
            ModelMismatchError: before anything is read, when the model cannot be rebuilt.
        """
        self.config()
        batch = []
        for i, image in enumerate(images):
            name = image if isinstance(image, str) else f"#{i + 1} ({len(image)} bytes)"
            data = read_path(image, self.max_bytes) if isinstance(image, str) else image
            try:
                batch.append(self.decode(data, max_pixels=max_pixels))
            except QueryImageError as exc:
                raise QueryImageError(exc.reason, f"query image {name}: {exc}") from exc
        return np.stack(batch) if batch else None


def read_path(path: str, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """The bytes of a query image on any Beam filesystem, at most `max_bytes` of them.

    Only regular files are read (a FIFO or a device such as /dev/zero would block or never end).

    Raises:
        QueryImageError: `too_large` over the limit, `unreadable` for anything else that stops the read.
    """
    name = safe_text(path)
    try:
        return read_bounded(path, max_bytes)
    except TooLargeError as exc:
        raise QueryImageError(
            reasons.TOO_LARGE, f"query image {name}: more than {max_bytes:,} bytes (raise the limit with --max-bytes)"
        ) from exc
    except NotRegularFileError as exc:
        raise QueryImageError(reasons.UNREADABLE, f"query image {name}: cannot read it: {exc}") from exc
    except Exception as exc:  # missing file, unknown scheme, permissions: the query's problem
        raise QueryImageError(reasons.UNREADABLE, f"query image {name}: cannot read it ({exc})") from exc
