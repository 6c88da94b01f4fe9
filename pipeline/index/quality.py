"""How good an index is: exact ground truth for held-out queries, recall@10, and tuning
nprobe / efSearch to the smallest value that reaches a recall target.
"""

from __future__ import annotations

import logging

import faiss
import numpy as np

from pipeline.index.train import hnsw_of, ivf_of

log = logging.getLogger(__name__)

K = 10  # recall@K is what index.json reports
SELF_FIRST_MIN = 0.99  # share of tuning queries that must find themselves first


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


def measure(index: faiss.Index, queries: np.ndarray, truth: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
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
            cache[value] = measure(index, queries, truth, labels)
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
