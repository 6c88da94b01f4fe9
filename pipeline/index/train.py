"""Choosing and training an index: the FAISS object for a factory string, the seeded random
sample (training vectors and held-out queries, read in one streaming pass), OPQ and IVF training.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import faiss
import numpy as np

from pipeline.config import IndexConfig
from pipeline.index import auto
from pipeline.index.io import Dataset, iter_batches
from pipeline.index.loading import drop_precomputed_table

log = logging.getLogger(__name__)

METRICS = {"cosine": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}


@dataclasses.dataclass
class Prepared:
    """A trained, empty index and the held-out queries, ready for vectors to be added."""

    index: faiss.Index
    index_type: str
    factory: str
    metric: str
    normalized: bool
    faiss_metric: int  # METRICS[metric], except cosine IVF-PQ: L2 on the unit vectors (see faiss_metric_for)
    train_size: int
    train_labels: np.ndarray  # the random training sample (empty when nothing is trained)
    eval_labels: np.ndarray  # recall@10 is reported on these
    tune_labels: np.ndarray  # nprobe / efSearch is tuned on these
    queries: np.ndarray  # float32 vectors of eval_labels then tune_labels (normalised if cosine)


def faiss_metric_for(index_type: str, metric: str) -> int:
    """The FAISS metric an index of this type is built with, for a --metric.

    Cosine is inner product on L2-normalised vectors, except for IVF-PQ: ranking PQ codes by inner
    product ignores the error in the reconstruction's norm, and on unit vectors the L2 distance
    (2 - 2 cos) ranks exactly as the cosine does for exact vectors but counts that norm error. On
    clustered 2048-d data this raised IVF-PQ's recall@10 ceiling from 0.967 to 0.981 (20k vectors,
    PQ256); docs/INDEX.md has the figures. The search side turns the distances back into cosines.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {sorted(METRICS)}; got {metric!r}")
    if metric == "cosine" and index_type == "ivf-pq":
        return faiss.METRIC_L2
    return METRICS[metric]


def new_index(factory: str, dim: int, faiss_metric: int) -> faiss.Index:
    """faiss.index_factory with a clear error for a bad factory string."""
    try:
        return faiss.index_factory(dim, factory, faiss_metric)
    except RuntimeError as exc:
        raise ValueError(f"{factory!r} is not a FAISS factory string FAISS can build at dim {dim}: {exc}") from exc


def ivf_of(index: faiss.Index):
    """The IndexIVF inside an index (through OPQ / pre-transforms), or None."""
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def hnsw_of(index: faiss.Index):
    """The HNSW index inside an index (through pre-transforms), or None."""
    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexPreTransform):
        inner = faiss.downcast_index(inner.index)
    return inner if hasattr(inner, "hnsw") else None


def resolve_index(index: str, n: int, dim: int, budget: int) -> tuple[str, str]:
    """(index type, factory) for an --index value: auto, a named type, or a raw factory string ("custom")."""
    if index == "auto":
        return auto.choose_index(n, dim, budget)
    if index in auto.INDEX_TYPES:
        index_type, factory = index, auto.factory_for(index, n, dim, budget)
        if index_type != "ivf-pq":
            need = auto.index_bytes(index_type, n, dim, nlist=auto.nlist_for(n, dim))
            if need > budget:
                log.warning("a %s index of %d vectors needs ~%d bytes, over the %d-byte budget", index, n, need, budget)
        return index_type, factory
    return "custom", index


def presize_flat_codes(index: faiss.Index, n: int) -> None:
    """Size the vector buffer of a flat index (or of an HNSW index's flat storage) for n vectors at once.

    FAISS grows it as a std::vector, doubling: at the last doubling the old and the new buffer are
    both resident, which took a 1M x 2048 flat build to a peak RSS of 14.8 GiB for an 8.2 GB index.
    Sized once, the peak is the index itself. Adding then shrinks the buffer's size first (the
    capacity stays), so it is never copied.
    """
    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexHNSW):
        inner = faiss.downcast_index(inner.storage)
    if isinstance(inner, faiss.IndexFlatCodes) and inner.ntotal == 0:
        inner.codes.resize(n * inner.code_size)


def _opq_of(index: faiss.Index):
    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexPreTransform):
        for i in range(inner.chain.size()):
            transform = faiss.downcast_VectorTransform(inner.chain.at(i))
            if isinstance(transform, faiss.OPQMatrix) and not transform.is_trained:
                return transform
    return None


def train_opq(opq: faiss.OPQMatrix, x: np.ndarray, *, seed: int, max_points: int = 32768) -> None:
    """Train an OPQ rotation with the parametric solution (Ge et al., "Optimized Product Quantization").

    The rotation is the top d_out eigenvectors of the sample's second-moment matrix, assigned
    greedily to the M sub-spaces so that each gets a balanced product of eigenvalues (so every
    sub-quantizer has about the same variance to code). It is stored in the OPQMatrix: index.faiss
    holds a standard faiss OPQ transform.

    Why not OPQMatrix.train: its non-parametric iterations retrain a PQ 50 times; at 2048 dims on
    the 2-core dev machine that took ~10 s per iteration for PQ64 and minutes for PQ256, and a
    few such iterations on top of this solution did not raise recall@10 on our test data.
    """
    rng = np.random.default_rng(seed)
    if len(x) > max_points:
        x = x[np.sort(rng.choice(len(x), max_points, replace=False))]
    d_out, m = opq.d_out, opq.M
    values, vectors = np.linalg.eigh((x.T @ x).astype(np.float64) / len(x))
    order = np.argsort(values)[::-1][:d_out]
    # Greedy on log-eigenvalues needs them >= 1 (else adding one *lowers* a product): scale first.
    kept = values[order]
    log_values = np.log(np.maximum(values / max(kept[kept > 0].min(initial=1e-12), 1e-12), 1.0))
    per_space = d_out // m
    buckets: list[list[int]] = [[] for _ in range(m)]
    products, counts = np.zeros(m), np.zeros(m, dtype=np.int64)
    for i in order:  # largest eigenvalue first, into the non-full sub-space with the smallest product
        b = int(np.argmin(np.where(counts < per_space, products, np.inf)))
        buckets[b].append(int(i))
        products[b] += log_values[i]
        counts[b] += 1
    rotation = vectors[:, [i for bucket in buckets for i in bucket]].astype(np.float32)  # d_in x d_out
    faiss.copy_array_to_vector(np.ascontiguousarray(rotation.T).ravel(), opq.A)  # A is d_out x d_in
    opq.is_trained = True
    opq.is_orthonormal = True


def _fast_pq_training(index: faiss.Index) -> None:
    # IVF-PQ trains M k-means of 256 centroids; faiss's defaults (25 iterations on up to 65,536
    # points each) cost minutes at M=256 on a few cores, for a codebook that 10 iterations on
    # 16,384 points gets nearly as good.
    ivf = ivf_of(index)
    pq = getattr(faiss.downcast_index(ivf), "pq", None) if ivf is not None else None
    if pq is not None:
        pq.cp.niter = 10
        pq.cp.max_points_per_centroid = 64


def read_rows(ds: Dataset, labels: np.ndarray, batch_rows: int) -> np.ndarray:
    """The vectors of the given labels (sorted, unique), in that order, in one streaming pass."""
    out = np.empty((len(labels), ds.dim), dtype=np.float32)
    filled = 0
    for shard in ds.shards:
        lo, hi = np.searchsorted(labels, [shard.offset, shard.offset + shard.rows])
        if lo == hi:
            continue  # no sampled row in this file: skip reading it
        for start, x, _ in iter_batches(shard, ds.dim, batch_rows):
            first = shard.offset + start
            a, b = np.searchsorted(labels, [first, first + len(x)])
            out[a:b] = x[labels[a:b] - first]
            filled += b - a
    assert filled == len(labels), (filled, len(labels))
    return out


def prepare(ds: Dataset, config: IndexConfig, *, batch_rows: int) -> Prepared:
    """Choose the index, draw the seeded sample (pass 1) and train. Raises ValueError on a bad factory string."""
    metric, seed = config.metric, config.seed
    n, dim = ds.ntotal, ds.dim
    index_type, factory = resolve_index(config.index_type, n, dim, config.memory_budget_bytes)
    faiss_metric = faiss_metric_for(index_type, metric)
    built = new_index(factory, dim, faiss_metric)
    drop_precomputed_table(built)  # before training, which would build it
    _fast_pq_training(built)
    ivf = ivf_of(built)
    if ivf is not None:
        ivf.cp.seed = seed
    train_size = 0 if built.is_trained else auto.train_size_for(n, dim, ivf.nlist if ivf is not None else None)
    n_eval, n_tune = auto.eval_queries_for(n), auto.tune_queries_for(n)
    # Random positions over the whole corpus (never its first rows). The eval queries are held out of
    # training and tuning; the tuning queries are held out of training too wherever the corpus is big
    # enough: vectors the quantizer was trained on sit closer to their centroids, so recall measured on
    # them is optimistic (tuned on training vectors, nprobe=1 scored 0.953 there and 0.940 on new queries).
    rng = np.random.default_rng(seed)
    picked = rng.choice(n, size=min(n, n_eval + n_tune + train_size), replace=False).astype(np.int64)
    eval_labels, rest = picked[:n_eval], picked[n_eval:]
    tune_labels = rest[:n_tune] if len(rest) else eval_labels
    # A small corpus has too few rows for both: training then overlaps the tuning queries.
    if len(rest) >= n_tune + train_size:
        train_labels = rest[n_tune : n_tune + train_size]
    else:
        train_labels = rest[len(rest) - train_size :]
    needed = np.unique(np.concatenate([eval_labels, tune_labels, train_labels]))
    log.info("index: %s (%s), %d vectors x %d; reading a sample of %d rows", index_type, factory, n, dim, len(needed))
    sample = read_rows(ds, needed, batch_rows)
    if metric == "cosine":
        faiss.normalize_L2(sample)
    queries = sample[np.searchsorted(needed, np.concatenate([eval_labels, tune_labels]))]
    if train_size:
        # Compact the training rows to the front of `sample` in place (each row moves only
        # towards the front, after it is read): a copy would hold the biggest array twice.
        rows = np.searchsorted(needed, np.sort(train_labels))
        for i, row in enumerate(rows):
            if i != row:
                sample[i] = sample[row]
        train = sample[: len(rows)]
        t0 = time.perf_counter()
        opq = _opq_of(built)
        if opq is not None:
            train_opq(opq, train, seed=seed)
        built.train(train)
        log.info("index: trained on %d random vectors in %.1fs", len(train), time.perf_counter() - t0)
    return Prepared(
        index=built,
        index_type=index_type,
        factory=factory,
        metric=metric,
        normalized=metric == "cosine",
        faiss_metric=faiss_metric,
        train_size=len(train_labels),
        train_labels=train_labels,
        eval_labels=eval_labels,
        tune_labels=tune_labels,
        queries=queries,
    )
