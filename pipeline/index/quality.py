"""How good an index is: exact ground truth for held-out queries, recall@10, and tuning
nprobe / efSearch to the smallest value that reaches a recall target.
"""

from __future__ import annotations

import dataclasses
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


def recall_per_query(found: np.ndarray, truth: np.ndarray, query_labels: np.ndarray, k: int = K) -> np.ndarray:
    """(hits, wanted) per query: how many of each query's k exact nearest neighbours the index found.

    The query itself is excluded on both sides (it is in the index, so it finds itself): counting it
    would inflate the figure by one free hit in ten.
    """
    out = np.zeros((len(found), 2), dtype=np.int64)
    for i, (got, want, own) in enumerate(zip(found, truth, query_labels)):
        want_k = {int(v) for v in [v for v in want if v >= 0 and v != own][:k]}
        got_k = {int(v) for v in [v for v in got if v >= 0 and v != own][:k]}
        out[i] = len(got_k & want_k), len(want_k)
    return out


def recall_at_k(found: np.ndarray, truth: np.ndarray, query_labels: np.ndarray, k: int = K) -> float:
    """Share of the queries' k exact nearest neighbours that the index found, the queries themselves excluded."""
    hits, wanted = recall_per_query(found, truth, query_labels, k).sum(axis=0)
    return float(hits / wanted) if wanted else 1.0


def recall_lower_bound(per_query: np.ndarray, z: float = 1.645) -> float:
    """One-sided 95% lower confidence bound of recall@10 from per-query (hits, wanted).

    The ratio estimator's standard error over the queries: a set of 500 queries measures recall
    near 0.95 to about +-0.005, so a value that only just reaches the target on one set can miss it
    on the next. Queries are the sampling unit (their neighbours are not independent).
    """
    hits, wanted = per_query[:, 0].astype(np.float64), per_query[:, 1].astype(np.float64)
    total = wanted.sum()
    if total == 0:
        return 1.0
    recall = float(hits.sum() / total)
    n = len(per_query)
    if n < 2:
        return recall
    residual = hits - recall * wanted
    se = np.sqrt(n / (n - 1) * np.sum(residual**2)) / total
    return float(recall - z * se)


@dataclasses.dataclass(frozen=True)
class Measurement:
    """Quality of one search-parameter value on one query set."""

    recall: float  # recall@10, the queries themselves excluded
    recall_low: float  # its one-sided 95% lower confidence bound
    self_first: float  # share of queries that find themselves first


def measure(index: faiss.Index, queries: np.ndarray, truth: np.ndarray, labels: np.ndarray) -> Measurement:
    """recall@10 (with its lower bound) and the share of queries whose first result is the query itself."""
    _, found = index.search(queries, K + 1)
    per_query = recall_per_query(found, truth, labels)
    hits, wanted = per_query.sum(axis=0)
    return Measurement(
        recall=float(hits / wanted) if wanted else 1.0,
        recall_low=recall_lower_bound(per_query),
        self_first=float(np.mean(found[:, 0] == labels)),
    )


@dataclasses.dataclass(frozen=True)
class QuerySet:
    """Queries (indexed vectors) with their exact top-(K+1) labels."""

    queries: np.ndarray
    truth: np.ndarray
    labels: np.ndarray


@dataclasses.dataclass
class Tuning:
    """What tuning chose and what it measured (index.json records all of it)."""

    params: dict  # {"nprobe": n} / {"efSearch": n} / {} for exact indexes
    held_out: Measurement  # on the held-out queries, at the chosen value
    target_met: bool  # the held-out lower bound reaches the target
    curve: list[dict]  # per value tried: recall on the tuning queries (and held-out where measured)
    warning: str | None = None


def _ladder(index: faiss.Index) -> tuple[str, int, list[int]] | None:
    """(parameter, smallest useful value, ascending candidates) of a tunable index, or None."""
    ivf, hnsw = ivf_of(index), hnsw_of(index)
    if ivf is not None:
        top = ivf.nlist
        return "nprobe", 1, sorted({*[1 << i for i in range(top.bit_length()) if 1 << i < top], top})
    if hnsw is not None:
        return "efSearch", 16, [16 << i for i in range(9)]  # below faiss's default of 16 saves little
    return None


def tune(index: faiss.Index, tuning: QuerySet, held_out: QuerySet, target: float) -> Tuning:
    """The smallest nprobe (IVF) or efSearch (HNSW) that holds the recall target on queries it was not tuned on.

    1. On the tuning queries: the smallest value at which recall@10 >= target and >= 99% of the
       queries (indexed vectors) find themselves first (search by id and near-duplicate lookups rely
       on that, and HNSW can miss it at low efSearch while recall looks fine). Not 100%: on clustered
       data a few HNSW nodes are reachable only at a huge efSearch (measured: efSearch 1342 instead of
       64 for 100k vectors, 10x slower, for 1 query in 500).
    2. Confirmed on the held-out queries: the value is raised until their recall's 95% lower
       confidence bound reaches the target as well, so that new queries meet it too (a value that
       only just reaches the target on 500 tuning queries scored 0.953 there and 0.940 on new ones).

    If that is out of reach (e.g. PQ codes too coarse) the smallest value within 0.005 of the best
    held-out recall is used, rather than paying for nprobe = nlist for nothing, and the result says
    so (`target_met` False, `warning`), loudly in the log too.
    """
    ladder = _ladder(index)
    if ladder is None:
        m = measure(index, held_out.queries, held_out.truth, held_out.labels)
        return Tuning({}, m, bool(m.recall_low >= target or m.recall >= 1.0), [])
    name, floor, candidates = ladder
    space = faiss.ParameterSpace()
    on_tuning: dict[int, Measurement] = {}
    on_held_out: dict[int, Measurement] = {}

    def at(value: int, queries: QuerySet, cache: dict[int, Measurement]) -> Measurement:
        if value not in cache:
            space.set_index_parameter(index, name, value)
            cache[value] = measure(index, queries.queries, queries.truth, queries.labels)
        return cache[value]

    def tuned(value: int) -> bool:
        m = at(value, tuning, on_tuning)
        return m.recall >= target and m.self_first >= SELF_FIRST_MIN

    def confirmed(value: int) -> bool:
        return tuned(value) and at(value, held_out, on_held_out).recall_low >= target

    chosen = _smallest(tuned, floor, candidates)
    if chosen is not None:
        chosen = _smallest(confirmed, chosen, [chosen, *(c for c in candidates if c > chosen)])
    warning = None
    if chosen is None:
        for value in candidates:
            at(value, held_out, on_held_out)
        best = max(m.recall for m in on_held_out.values())
        chosen = min(v for v in candidates if on_held_out[v].recall >= best - 0.005)
        warning = (
            f"recall@10 target {target:.2f} not reached on held-out queries (with 99% of queries finding "
            f"themselves first): best {best:.3f}; using {name}={chosen}, recall@10 {on_held_out[chosen].recall:.3f}. "
            "Use a bigger index type or a larger memory budget for this target."
        )
        log.warning("index: %s", warning)
    space.set_index_parameter(index, name, chosen)  # also stored inside index.faiss
    final = at(chosen, held_out, on_held_out)
    log.info(
        "index: %s=%d gives recall@10 %.3f on %d tuning queries and %.3f (>= %.3f at 95%%) on %d held-out queries",
        name, chosen, at(chosen, tuning, on_tuning).recall, len(tuning.labels), final.recall, final.recall_low,
        len(held_out.labels),
    )  # fmt: skip
    curve = [
        {
            name: value,
            "recall_tuning": round(m.recall, 4),
            "self_first": round(m.self_first, 4),
            **({"recall_held_out": round(on_held_out[value].recall, 4)} if value in on_held_out else {}),
        }
        for value, m in sorted(on_tuning.items())
    ]
    return Tuning({name: int(chosen)}, final, warning is None, curve, warning)


def _smallest(good, floor: int, candidates: list[int]) -> int | None:
    """The smallest value >= floor for which good(value), assuming good is monotonic: the first good
    candidate, then a bisection between it and the candidate before."""
    previous = floor - 1
    for value in candidates:
        if value < floor:
            continue
        if good(value):
            lo, hi = previous, value  # good(hi) and not good(lo): bisect for the smallest
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if good(mid) else (mid, hi)
            return hi
        previous = value
    return None
