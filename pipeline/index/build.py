"""BuildIndex: an embeddings dataset -> INDEX_DIR/{index.faiss, ids.parquet, index.json}.

Two streaming passes over the Parquet files, one record batch at a time:
1. pick a seeded random sample of row positions (training vectors plus two
   disjoint sets of held-out queries) and read just those rows;
2. add every vector to the trained index, write ids.parquet, and compute the
   exact top-k of the queries on the same batches (the ground truth for recall).
Then nprobe / efSearch is tuned on one query set and recall@10 reported on the
other. Files are written to a staging directory beside the output and moved
into place only when whole (index.json last).
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import time

import faiss
import numpy as np

from pipeline import __version__
from pipeline.index import auto
from pipeline.index.io import (
    Dataset,
    IdsWriter,
    file_size,
    iter_batches,
    publish,
    remove_tree,
    scan_dataset,
    staging_dir,
    write_faiss,
    write_json,
)

log = logging.getLogger(__name__)

K = 10  # recall@K is what index.json reports
SELF_FIRST_MIN = 0.99  # share of tuning queries that must find themselves first
METRICS = {"cosine": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}
FORMAT_VERSION = 1


@dataclasses.dataclass
class Prepared:
    """A trained, empty index and the held-out queries, ready for vectors to be added."""

    index: faiss.Index
    index_type: str
    factory: str
    metric: str
    normalized: bool
    train_size: int
    train_labels: np.ndarray  # the random training sample (empty when nothing is trained)
    eval_labels: np.ndarray  # recall@10 is reported on these
    tune_labels: np.ndarray  # nprobe / efSearch is tuned on these
    queries: np.ndarray  # float32 vectors of eval_labels then tune_labels (normalised if cosine)

    @property
    def faiss_metric(self) -> int:
        return METRICS[self.metric]


def new_index(factory: str, dim: int, metric: str) -> faiss.Index:
    """faiss.index_factory with a clear error for a bad factory string."""
    try:
        return faiss.index_factory(dim, factory, METRICS[metric])
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


def prepare(ds: Dataset, *, index: str, metric: str, memory_budget: str | int, seed: int, batch_rows: int) -> Prepared:
    """Choose the index, draw the seeded sample (pass 1) and train. Raises ValueError on bad options."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {sorted(METRICS)}; got {metric!r}")
    n, dim = ds.ntotal, ds.dim
    index_type, factory = resolve_index(index, n, dim, auto.parse_memory_budget(memory_budget))
    built = new_index(factory, dim, metric)
    _fast_pq_training(built)
    ivf = ivf_of(built)
    if ivf is not None:
        ivf.cp.seed = seed
    train_size = 0 if built.is_trained else auto.train_size_for(n, dim, ivf.nlist if ivf is not None else None)
    n_eval, n_tune = auto.eval_queries_for(n), auto.tune_queries_for(n)
    # Random positions over the whole corpus (never its first rows): eval queries are held out of
    # training; the tuning queries may overlap the training sample, as any indexed vector may.
    rng = np.random.default_rng(seed)
    picked = rng.choice(n, size=min(n, n_eval + max(n_tune, train_size)), replace=False).astype(np.int64)
    eval_labels, rest = picked[:n_eval], picked[n_eval:]
    tune_labels = rest[:n_tune] if len(rest) else eval_labels
    train_labels = rest[:train_size]
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
        train_size=len(train_labels),
        train_labels=train_labels,
        eval_labels=eval_labels,
        tune_labels=tune_labels,
        queries=queries,
    )


class ExactNeighbours:
    """Exact top-k of a fixed query set, accumulated batch by batch (the recall ground truth)."""

    def __init__(self, queries: np.ndarray, k: int, metric: int) -> None:
        self._queries, self._k, self._metric = queries, k, metric
        self._heap = faiss.ResultHeap(len(queries), k, keep_max=metric == faiss.METRIC_INNER_PRODUCT)

    def add(self, x: np.ndarray, first_label: int) -> None:
        """Account for the vectors x, whose labels are first_label, first_label+1, ..."""
        distances, ids = faiss.knn(self._queries, x, min(self._k, len(x)), metric=self._metric)
        self.add_result(distances, ids + first_label)

    def add_result(self, distances: np.ndarray, labels: np.ndarray) -> None:
        """Merge another partial top-k (e.g. from one shard of a distributed build)."""
        self._heap.add_result(distances, labels)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        self._heap.finalize()
        return self._heap.D, self._heap.I


def recall_at_k(found: np.ndarray, truth: np.ndarray, query_labels: np.ndarray, k: int = K) -> float:
    """Share of each query's k exact nearest neighbours that the index found, the query itself excluded.

    Excluding the query (it is in the index, so it finds itself) keeps the figure from being
    inflated by one free hit in ten.
    """
    hits = total = 0
    for got, want, own in zip(found, truth, query_labels):
        want_k = {int(v) for v in [v for v in want if v >= 0 and v != own][:k]}
        got_k = {int(v) for v in [v for v in got if v >= 0 and v != own][:k]}
        hits += len(got_k & want_k)
        total += len(want_k)
    return hits / total if total else 1.0


def _measure(index: faiss.Index, queries: np.ndarray, truth: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(recall@10, share of queries whose first result is the query itself)."""
    _, found = index.search(queries, K + 1)
    return recall_at_k(found, truth, labels), float(np.mean(found[:, 0] == labels))


def tune(index: faiss.Index, queries: np.ndarray, truth: np.ndarray, labels: np.ndarray, target: float) -> dict:
    """Smallest nprobe (IVF) or efSearch (HNSW) at which, on the tuning queries, recall@10 >= target
    and >= 99% of the queries (indexed vectors) find themselves first: search by id and
    near-duplicate lookups rely on that, and HNSW can miss it at low efSearch while recall looks
    fine. Not 100%: on clustered data a few HNSW nodes are reachable only at a huge efSearch
    (measured: efSearch 1342 instead of 64 for 100k vectors, 10x slower, for 1 query in 500).

    If that is out of reach (e.g. PQ codes too coarse) it returns the smallest value within 0.005
    of the best recall seen, rather than paying for nprobe = nlist for nothing.
    """
    ivf, hnsw = ivf_of(index), hnsw_of(index)
    if ivf is not None:
        name, floor, top = "nprobe", 1, ivf.nlist
        candidates = sorted({*[1 << i for i in range(top.bit_length()) if 1 << i < top], top})
    elif hnsw is not None:
        name, floor = "efSearch", 16  # below faiss's default of 16 saves little
        candidates = [16 << i for i in range(9)]
    else:
        return {}
    space = faiss.ParameterSpace()
    cache: dict[int, tuple[float, float]] = {}

    def good(value: int) -> bool:
        if value not in cache:
            space.set_index_parameter(index, name, value)
            cache[value] = _measure(index, queries, truth, labels)
        recall, self_first = cache[value]
        return recall >= target and self_first >= SELF_FIRST_MIN

    previous = floor - 1
    for value in candidates:
        if good(value):
            lo, hi = previous, value  # good(hi) and not good(lo): bisect for the smallest
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if good(mid) else (mid, hi)
            chosen = hi
            break
        previous = value
    else:
        best = max(r for r, _ in cache.values())
        chosen = min(v for v in candidates if cache[v][0] >= best - 0.005)
        log.warning(
            "index: recall@10 target %.2f (with 99%% of queries finding themselves) not reached; best recall %.3f, "
            "using %s=%d (self first for %.1f%%)", target, best, name, chosen, 100 * cache[chosen][1],
        )  # fmt: skip
    space.set_index_parameter(index, name, chosen)  # also stored inside index.faiss
    log.info("index: %s=%d gives recall@10 %.3f on %d tuning queries", name, chosen, cache[chosen][0], len(queries))
    return {name: int(chosen)}


def finish(
    index: faiss.Index,
    prepared: Prepared,
    ds: Dataset,
    truth: ExactNeighbours,
    *,
    ids_rows: int,
    staging: str,
    output: str,
    started: float,
    recall_target: float,
) -> dict:
    """Validate, tune, measure, write and publish; returns the index.json content."""
    if index.ntotal != ds.ntotal or ids_rows != ds.ntotal:
        raise RuntimeError(
            f"index holds {index.ntotal} vectors and ids.parquet {ids_rows} rows; the dataset has {ds.ntotal}"
        )
    _, truth_labels = truth.result()
    n_eval = len(prepared.eval_labels)
    eval_q, tune_q = prepared.queries[:n_eval], prepared.queries[n_eval:]
    t_tune = time.perf_counter()
    params = tune(index, tune_q, truth_labels[n_eval:], prepared.tune_labels, recall_target)
    log.info("index: tuned in %.1fs", time.perf_counter() - t_tune)
    recall, _ = _measure(index, eval_q, truth_labels[:n_eval], prepared.eval_labels)
    write_faiss(index, f"{staging}/index.faiss")
    meta = {
        "format_version": FORMAT_VERSION,
        "factory": prepared.factory,
        "index_type": prepared.index_type,
        "metric": prepared.metric,
        "normalized": prepared.normalized,
        "dim": ds.dim,
        "ntotal": int(index.ntotal),
        "model": ds.model,
        "model_config": ds.model_config,
        "source": ds.source,
        "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "build_seconds": round(time.perf_counter() - started, 3),
        "train_size": prepared.train_size,
        "search_params": params,
        "recall_at_10": round(recall, 4),
        "recall_queries": n_eval,
        "bytes": file_size(f"{staging}/index.faiss"),
        "has_thumbnails": ds.has_thumbnails,
        "embedpipe_version": __version__,
    }
    write_json(f"{staging}/index.json", meta)
    publish(staging, output)
    log.info("index: %s, %d vectors, recall@10 %.3f -> %s", prepared.factory, index.ntotal, recall, output)
    return meta


def build_index(
    embeddings: str,
    output: str,
    *,
    index: str = "auto",
    metric: str = "cosine",
    memory_budget: str | int = "4GB",
    seed: int = 0,
    recall_target: float = 0.95,
    batch_rows: int = 8192,
) -> dict:
    """Build a FAISS index of an embeddings dataset in this process.

    Args:
        embeddings: OUTPUT of `embedpipe embed` (holding embeddings/) or its embeddings/ folder.
        output: index directory to (re)place: index.faiss, ids.parquet, index.json.
        index: auto | flat | ivf-flat | ivf-sq8 | ivf-pq | hnsw, or a raw FAISS factory string.
        metric: cosine (L2-normalised vectors, inner product) or l2.
        memory_budget: RAM the finished index may use ("4GB", "8GiB", bytes); drives `auto` and PQ size.
        seed: seeds the training sample, the held-out queries and k-means.
        recall_target: recall@10 that nprobe / efSearch are tuned to reach.
        batch_rows: vectors read per record batch.

    Returns:
        The content of index.json.

    Raises:
        ValueError: empty dataset, mixed model fingerprints or dimensions, duplicate ids, a bad
            vector, or bad options.
    """
    started = time.perf_counter()
    ds = scan_dataset(embeddings)
    prepared = prepare(ds, index=index, metric=metric, memory_budget=memory_budget, seed=seed, batch_rows=batch_rows)
    built = prepared.index
    staging = staging_dir(output)
    try:
        truth = ExactNeighbours(prepared.queries, K + 1, prepared.faiss_metric)
        ids = IdsWriter(f"{staging}/ids.parquet", thumbnails=ds.has_thumbnails)
        t_add = time.perf_counter()
        try:
            for shard in ds.shards:
                for start, x, batch in iter_batches(shard, ds.dim, batch_rows, ("uri", "thumbnail")):
                    if prepared.normalized:
                        faiss.normalize_L2(x)
                    built.add(x)  # sequential labels: files in sorted order, rows in file order
                    truth.add(x, shard.offset + start)
                    ids.write(batch, shard.offset + start)
        finally:
            ids.close()
        log.info("index: added %d vectors in %.1fs", built.ntotal, time.perf_counter() - t_add)
        return finish(
            built,
            prepared,
            ds,
            truth,
            ids_rows=ids.rows,
            staging=staging,
            output=output,
            started=started,
            recall_target=recall_target,
        )
    except BaseException:
        remove_tree(staging)
        raise
