"""Searcher: nearest neighbours in an index directory, by vector, by stored id or by image.

An index directory (written by `embedpipe index`, see docs/ARCHITECTURE.md) holds
`index.faiss`, `ids.parquet` (label -> id, uri, optional thumbnail) and
`index.json`. Scores follow the index metric: cosine similarity (higher is
closer) for `cosine`, Euclidean distance (lower is closer) for `l2`.

Query images are embedded with exactly the model the index was built from
(query_model.py): `index.json` records its `model_config`, which must rebuild the
recorded fingerprint, and they are decoded the way `embedpipe embed` decoded the corpus.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import logging
import os
import shutil
import threading
import time
from collections.abc import Sequence

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import DEFAULT_MAX_PIXELS, ModelConfig
from pipeline.errors import EmbedpipeError
from pipeline.index.loading import (
    IndexFormatError,
    drop_precomputed_table,
    faiss_metric_of,
    localise,
    read_index,
    read_meta,
)
from pipeline.index.query_model import ModelMismatchError, QueryImageError, QueryModel

__all__ = [
    "Hit",
    "IndexFormatError",
    "ModelMismatchError",
    "QueryImageError",
    "Searcher",
    "UnknownIdError",
]

log = logging.getLogger(__name__)

_THUMB_CACHE_GROUPS = 8  # row groups of thumbnails kept decoded (~4096 rows each)


class UnknownIdError(EmbedpipeError, KeyError):
    """An id that is not in the index (exit code 2)."""

    exit_code = 2

    def __str__(self) -> str:  # KeyError would print the repr of its argument
        return str(self.args[0]) if self.args else "unknown id"


@dataclasses.dataclass(frozen=True)
class Hit:
    """One neighbour: rank is 1-based; score is a cosine similarity or an L2 distance (see index metric)."""

    id: str
    uri: str
    score: float
    rank: int
    label: int


class Searcher:
    """Nearest-neighbour queries on one index directory.

    Thread-safe: the server calls it from several threads. Search by id keeps
    the query item in its results, always at rank 1.
    """

    def __init__(
        self,
        index: faiss.Index,
        meta: dict,
        ids_path: str,
        *,
        index_dir: str,
        temp_dir: str | None = None,
        mmap: bool = False,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        batch_size: int = 8,
    ) -> None:
        """Use `Searcher.open`; this checks that the parts fit together."""
        self.index = index
        self.meta = meta
        self.index_dir = index_dir
        self.mmap = mmap
        self.max_pixels = max_pixels
        self.batch_size = batch_size
        self._temp_dir = temp_dir
        self._lock = threading.Lock()
        self._label_of: dict[str, int] | None = None
        self._direct_map_ready = False
        self._thumb_groups: collections.OrderedDict[int, pa.Array] = collections.OrderedDict()

        if index.d != meta["dim"] or index.ntotal != meta["ntotal"]:
            raise IndexFormatError(
                f"index.faiss holds {index.ntotal} vectors of dim {index.d} but index.json says "
                f"{meta['ntotal']} of dim {meta['dim']}: the directory mixes two builds"
            )
        compare = faiss_metric_of(meta)
        if index.metric_type != (faiss.METRIC_INNER_PRODUCT if compare == "inner_product" else faiss.METRIC_L2):
            raise IndexFormatError(f"index.json says faiss_metric {compare!r} but index.faiss uses another metric")
        self.normalize = bool(meta.get("normalized", meta["metric"] == "cosine"))
        # Cosine IVF-PQ indexes rank unit vectors by squared L2 distance, 2 - 2 cos: scores convert back.
        self._cosine_from_l2 = meta["metric"] == "cosine" and compare == "l2"

        self._ids_file = pq.ParquetFile(ids_path)
        names = self._ids_file.schema_arrow.names
        if not {"label", "id", "uri"} <= set(names):
            raise IndexFormatError(f"{ids_path} needs columns label, id, uri; it has {names}")
        table = self._ids_file.read(columns=["label", "id", "uri"])
        labels = table.column("label").to_numpy()
        if len(labels) != index.ntotal or not np.array_equal(labels, np.arange(index.ntotal)):
            raise IndexFormatError(f"{ids_path} must list labels 0..{index.ntotal - 1} in order (one row per vector)")
        # Arrow arrays: a fraction of the memory of Python lists of str for big indexes.
        self._ids = table.column("id").combine_chunks()
        self._uris = table.column("uri").combine_chunks()
        self.has_thumbnails = "thumbnail" in names
        meta_rows = self._ids_file.metadata
        self._group_starts = list(
            np.cumsum([0] + [meta_rows.row_group(i).num_rows for i in range(meta_rows.num_row_groups)])[:-1]
        )
        self.query_model = QueryModel(
            meta,
            index_dir=index_dir,
            thumbnails=bool(meta.get("has_thumbnails", self.has_thumbnails)),
            max_pixels=max_pixels,
            batch_size=batch_size,
        )

    @classmethod
    def open(
        cls,
        index_dir: str,
        *,
        mmap: bool = True,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        batch_size: int = 8,
        search_params: dict | None = None,
    ) -> Searcher:
        """Open an index directory on any Beam filesystem (remote ones are copied to a temp dir first).

        Args:
            index_dir: the directory `embedpipe index --output` wrote.
            mmap: memory-map the index where its type allows (IVF lists, flat codes).
            max_pixels: query images with more pixels are refused (same default as `embedpipe embed`).
            batch_size: images per model call in `search_images`.
            search_params: overrides of index.json's search_params, e.g. {"nprobe": 64}.
        """
        start = time.perf_counter()
        local, temp_dir = localise(index_dir)
        try:
            meta = read_meta(os.path.join(local, "index.json"))
            index, mapped = read_index(os.path.join(local, "index.faiss"), mmap=mmap)
            drop_precomputed_table(index)
            params = {**(meta.get("search_params") or {}), **(search_params or {})}
            space = faiss.ParameterSpace()
            for name, value in params.items():
                try:
                    space.set_index_parameter(index, name, value)
                except RuntimeError as exc:
                    raise IndexFormatError(f"search parameter {name}={value} does not apply to this index") from exc
            meta = {**meta, "search_params": params}
            searcher = cls(
                index,
                meta,
                os.path.join(local, "ids.parquet"),
                index_dir=index_dir,
                temp_dir=temp_dir,
                mmap=mapped,
                max_pixels=max_pixels,
                batch_size=batch_size,
            )
        except BaseException:
            if temp_dir:
                shutil.rmtree(temp_dir, ignore_errors=True)
            raise
        log.info(
            "opened index %s: %d vectors, %s, in %.2fs",
            index_dir,
            index.ntotal,
            meta.get("factory"),
            time.perf_counter() - start,
        )
        return searcher

    @property
    def ntotal(self) -> int:
        """Number of vectors in the index."""
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        """Vector dimension."""
        return int(self.index.d)

    def close(self) -> None:
        """Drop the temporary copy of a remote index (a local index is left alone)."""
        if self._temp_dir:
            shutil.rmtree(self._temp_dir, ignore_errors=True)
            self._temp_dir = None

    def __enter__(self) -> Searcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- ids -------------------------------------------------------------------------------------

    def label_of(self, id: str) -> int:
        """The label of a stored id; UnknownIdError if the index does not hold it."""
        if self._label_of is None:
            with self._lock:
                if self._label_of is None:
                    # Built on first use: a dict costs ~100 bytes per id, paid only by id lookups.
                    self._label_of = {value: i for i, value in enumerate(self._ids.to_pylist())}
        label = self._label_of.get(id)
        if label is None:
            raise UnknownIdError(f"id {id!r} is not in the index")
        return label

    def thumbnail(self, id: str) -> bytes | None:
        """The stored JPEG thumbnail of an id (None when the index has none); UnknownIdError for unknown ids."""
        label = self.label_of(id)
        if not self.has_thumbnails:
            return None
        group = bisect.bisect_right(self._group_starts, label) - 1
        with self._lock:  # ParquetFile is not thread-safe; the cache is shared
            values = self._thumb_groups.get(group)
            if values is None:
                # Kept as one Arrow array: one Python object per thumbnail served, not per row read.
                values = self._ids_file.read_row_group(group, columns=["thumbnail"]).column(0).combine_chunks()
                self._thumb_groups[group] = values
                if len(self._thumb_groups) > _THUMB_CACHE_GROUPS:
                    self._thumb_groups.popitem(last=False)
            else:
                self._thumb_groups.move_to_end(group)
        return values[label - self._group_starts[group]].as_py()

    # ---- search ----------------------------------------------------------------------------------

    def _check_k(self, k: int) -> int:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive integer; got {k!r}")
        return int(k)

    def _raw_search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self.normalize:
            norms = np.linalg.norm(x, axis=1, keepdims=True)
            x = x / np.where(norms > 0, norms, 1.0)
        distances, labels = self.index.search(np.ascontiguousarray(x, dtype=np.float32), min(k, self.ntotal))
        if self._cosine_from_l2:
            distances = 1.0 - distances / 2.0
        elif self.meta["metric"] == "l2":
            # FAISS reports squared L2; the API promises the distance itself.
            distances = np.sqrt(np.maximum(distances, 0.0))
        return distances, labels

    def _hits(self, scores: Sequence[float], labels: Sequence[int]) -> list[Hit]:
        pairs = [(float(s), int(lab)) for s, lab in zip(scores, labels) if lab >= 0]  # -1: fewer than k found
        return [
            Hit(id=self._ids[lab].as_py(), uri=self._uris[lab].as_py(), score=s, rank=r, label=lab)
            for r, (s, lab) in enumerate(pairs, start=1)
        ]

    def search_vectors(self, vectors: np.ndarray, k: int = 10) -> list[list[Hit]]:
        """The k nearest stored items of each query vector (N x dim, or one vector of dim)."""
        k = self._check_k(k)
        x = np.asarray(vectors, dtype=np.float32)
        if x.ndim == 1:
            x = x[None, :]
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"query vectors must have shape (n, {self.dim}); got {np.shape(vectors)}")
        if not np.isfinite(x).all():
            raise ValueError("query vectors contain NaN or infinity")
        if len(x) == 0:
            return []
        scores, labels = self._raw_search(x, k)
        return [self._hits(s, lab) for s, lab in zip(scores, labels)]

    def vector_of(self, label: int) -> np.ndarray:
        """The stored vector of a label (as the index holds it: lossy for PQ/SQ codes)."""
        if not self._direct_map_ready:
            with self._lock:
                ivf = faiss.try_extract_index_ivf(self.index)
                # IVF lists know label -> (list, offset) only after a direct map is built (once).
                if ivf is not None and ivf.direct_map.type == faiss.DirectMap.NoMap:
                    ivf.make_direct_map()
                self._direct_map_ready = True
        try:
            return self.index.reconstruct(int(label))
        except RuntimeError as exc:
            raise ValueError(
                f"index type {self.meta.get('factory')!r} cannot return stored vectors, so search by id is "
                "not available; search by image or vector instead"
            ) from exc

    def search_ids(self, ids: Sequence[str], k: int = 10) -> list[list[Hit]]:
        """Neighbours of stored items, searched with their stored vectors.

        The query item itself is always hit 1. With exact indexes it is found
        anyway (score 1.0 / distance 0); other items with the same vector would
        tie with it, so it is moved first. With lossy codes (PQ, SQ) the search
        may miss it or score it below another item: it is then put first with
        the score of its stored vector, so scores need not be monotonic there.
        """
        k = self._check_k(k)
        if isinstance(ids, str):
            raise TypeError("search_ids takes a sequence of ids, not one string")
        labels = [self.label_of(value) for value in ids]
        if not labels:
            return []
        vectors = np.stack([self.vector_of(label) for label in labels]).astype(np.float32)
        scores, found = self._raw_search(vectors, k)
        out = []
        for query, label, row_scores, row_labels in zip(vectors, labels, scores, found):
            pairs = [(float(s), int(lab)) for s, lab in zip(row_scores, row_labels) if lab >= 0]
            own = [p for p in pairs if p[1] == label]
            if own:
                self_pair = own[0]
            elif self.meta["metric"] == "l2":
                self_pair = (0.0, label)
            else:  # the normalised query against its own stored vector
                self_pair = (float(np.linalg.norm(query)), label)
            rest = [p for p in pairs if p[1] != label]
            ordered = ([self_pair, *rest])[:k]
            out.append(self._hits([s for s, _ in ordered], [lab for _, lab in ordered]))
        return out

    # ---- images ----------------------------------------------------------------------------------

    def model_config(self) -> ModelConfig:
        """The ModelConfig that rebuilds the index's model; ModelMismatchError if there is none."""
        return self.query_model.config()

    def warm(self) -> None:
        """Build the query model now (a few seconds) instead of on the first image query."""
        self.query_model.warm()

    def decode(self, data: bytes, *, max_pixels: int | None = None) -> np.ndarray:
        """Query image bytes -> model input pixels, decoded exactly as `embedpipe embed` decodes.

        Raises QueryImageError with a reason code (pipeline.reasons) for bad images.
        """
        return self.query_model.decode(data, max_pixels=max_pixels)

    def embed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 (N, S, S, 3) -> float32 (N, dim) with the index's model."""
        return self.query_model.embed(pixels)

    def search_images(
        self, images: Sequence[str | bytes], k: int = 10, *, max_pixels: int | None = None
    ) -> list[list[Hit]]:
        """Embed query images (paths on any Beam filesystem, or encoded bytes) and search.

        Raises QueryImageError (with the query's position and a reason code) for an
        image that cannot be read or decoded, ModelMismatchError when the index's
        model cannot be rebuilt.
        """
        k = self._check_k(k)
        pixels = self.query_model.pixels_of(images, max_pixels=max_pixels)
        if pixels is None:
            return []
        return self.search_vectors(self.embed_pixels(pixels), k)

    def stats(self) -> dict:
        """What the index is: size, model, type, build facts, and whether image queries work."""
        keys = (
            "factory", "index_type", "metric", "normalized", "model", "model_config", "source", "built_at",
            "build_seconds", "train_size", "search_params", "recall_at_10", "recall_queries", "bytes",
            "embedpipe_version",
        )  # fmt: skip
        out = {key: self.meta.get(key) for key in keys}
        out["faiss_metric"] = faiss_metric_of(self.meta)
        image_error = self.query_model.error()
        out.update(
            index_dir=self.index_dir,
            ntotal=self.ntotal,
            dim=self.dim,
            has_thumbnails=self.has_thumbnails,
            memory_mapped=self.mmap,
            image_search=image_error is None,
            image_search_error=image_error,
        )
        return out
