"""Near-duplicate groups of an index directory: each vector's closest neighbours above a cosine
threshold, joined into groups with union-find.

Time and memory stay bounded at millions of vectors (docs/DUPLICATES.md):

- Vectors are compared cell by cell: an IVF index's own lists (each against itself and its
  `probes - 1` nearest lists; no vector is quantized again), else k-means cells, else (at most
  `exact_max` vectors) every pair. FAISS's k-NN keeps only each query's best scores: no n x n matrix.
- Each vector keeps its `neighbours` closest others (n x k scores and labels). The distribution of
  the closest one drives `--auto` (threshold.py); the pairs above the threshold are the edges of the groups.

Scores are cosine similarities of the vectors as the index stores them (exact for Flat and
IVF-Flat; SQ8 codes move a cosine by ~1e-4, at most ~1e-3 measured at 2048-d; PQ codes by more).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import math
import os
import shutil
import time

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.index.loading import localise, read_index, read_meta
from pipeline.index.threshold import LOG_FLOOR, choose_threshold, nn_distances
from pipeline.index.train import ivf_of

log = logging.getLogger(__name__)

DEFAULT_PROBES = 4  # cells each vector is compared with: its own and the 3 nearest (see the benchmark)
DEFAULT_NEIGHBOURS = 16  # closest others kept per vector
EXACT_MAX = 20_000  # up to this many vectors (non-IVF indexes), every pair is compared
BLOCK_ELEMENTS = 1 << 21  # floats handled at once when assigning cells and scoring groups (8 MiB)
QUERY_ROWS = 4096  # vectors of a cell searched at once
CAND_CHUNK = 32_768  # vectors decoded at once as search targets (256 MiB at 2048-d): bounds a huge cell
MEDOID_MAX = 256  # groups up to this size get the member closest to all others as representative
GROUPS_SCHEMA = pa.schema(
    [
        pa.field("group_id", pa.int64(), nullable=False),
        pa.field("id", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("score_to_representative", pa.float32(), nullable=False),
        pa.field("representative", pa.string(), nullable=False),
    ]
)


class IndexVectors:
    """The stored vectors of an index directory, unit-normalised, with their ids and uris."""

    def __init__(self, index_dir: str) -> None:
        """Open INDEX_DIR (any Beam filesystem; remote ones are copied to a temporary directory)."""
        self.index_dir = index_dir
        self._local, self._temp = localise(index_dir)
        try:
            self.meta = read_meta(os.path.join(self._local, "index.json"))
            self.index, _ = read_index(os.path.join(self._local, "index.faiss"), mmap=True)
            table = pq.read_table(os.path.join(self._local, "ids.parquet"), columns=["label", "id", "uri"])
            if not np.array_equal(table.column("label").to_numpy(), np.arange(self.index.ntotal)):
                raise ValueError(f"{index_dir}/ids.parquet must list labels 0..{self.index.ntotal - 1} in order")
            self.ids = table.column("id").combine_chunks()
            self.uris = table.column("uri").combine_chunks()
            self.ivf = ivf_of(self.index)
            if self.ivf is not None and self.ivf.direct_map.type == faiss.DirectMap.NoMap:
                self.ivf.make_direct_map()  # label -> (list, offset), 8 bytes per vector
            self.vectors(np.arange(min(1, self.ntotal)))  # fail now, with a clear message
        except BaseException:
            self.close()
            raise

    @property
    def ntotal(self) -> int:
        """Number of vectors."""
        return int(self.index.ntotal)

    def vectors(self, labels: np.ndarray) -> np.ndarray:
        """float32 (len(labels), dim) unit vectors of the labels."""
        labels = np.ascontiguousarray(labels, dtype=np.int64)
        if len(labels) == 0:
            return np.zeros((0, self.index.d), dtype=np.float32)
        try:
            x = self.index.reconstruct_batch(labels)
        except RuntimeError as exc:
            raise ValueError(
                f"index type {self.meta.get('factory')!r} cannot return its stored vectors, which finding "
                "duplicates needs; build the index with --index flat, ivf-flat or ivf-sq8"
            ) from exc
        x = np.ascontiguousarray(x, dtype=np.float32)
        faiss.normalize_L2(x)
        return x

    def close(self) -> None:
        """Drop the temporary copy of a remote index."""
        if self._temp:
            shutil.rmtree(self._temp, ignore_errors=True)
            self._temp = None

    def __enter__(self) -> IndexVectors:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclasses.dataclass
class Partition:
    """Cells of labels, and for each cell the cells it is compared with (itself first)."""

    members: list[np.ndarray]
    probes: np.ndarray  # (cells, p) cell ids
    method: str


def _cell_neighbours(centroids: np.ndarray, probes: int, metric: int) -> np.ndarray:
    """(cells, p) the p cells nearest each cell's centroid, the cell itself first."""
    cells = len(centroids)
    p = max(1, min(probes, cells))
    _, near = faiss.knn(centroids, centroids, min(p + 1, cells), metric=metric)
    return np.array([[c, *(int(x) for x in near[c] if x >= 0 and x != c)][:p] for c in range(cells)], np.int64)


def partition(vectors: IndexVectors, *, probes: int, exact_max: int, seed: int = 0) -> Partition:
    """How the vectors are split for comparison (see the module docstring)."""
    n = vectors.ntotal
    ivf = vectors.ivf
    if ivf is not None:
        invlists = ivf.invlists
        members = []
        for cell in range(ivf.nlist):
            size, ptr = invlists.list_size(cell), invlists.get_ids(cell)
            members.append(faiss.rev_swig_ptr(ptr, size).astype(np.int64) if size else np.zeros(0, np.int64))
            invlists.release_ids(cell, ptr)
        centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist)
        near = _cell_neighbours(centroids, probes, ivf.quantizer.metric_type)
        return Partition(members, near, f"the index's {ivf.nlist} IVF lists, {near.shape[1]} per vector")
    if n <= exact_max:
        return Partition([np.arange(n, dtype=np.int64)], np.zeros((1, 1), dtype=np.int64), "every pair (exact)")
    # Cells of ~sqrt(n / probes) vectors balance assigning (n x cells) against comparing (n x probes x size).
    cells = max(2, int(math.sqrt(probes * n)))
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(n, size=min(n, 16 * cells), replace=False))
    kmeans = faiss.Kmeans(vectors.index.d, cells, niter=5, seed=seed, spherical=True, min_points_per_centroid=1)
    kmeans.train(vectors.vectors(sample))
    assign = np.empty(n, dtype=np.int64)
    step = max(1, BLOCK_ELEMENTS // max(cells, vectors.index.d))
    for start in range(0, n, step):
        labels = np.arange(start, min(n, start + step))
        assign[labels] = kmeans.index.search(vectors.vectors(labels), 1)[1][:, 0]
    order = np.argsort(assign, kind="stable")
    bounds = np.searchsorted(assign[order], np.arange(cells + 1))
    members = [order[bounds[c] : bounds[c + 1]] for c in range(cells)]
    near = _cell_neighbours(kmeans.centroids, probes, faiss.METRIC_INNER_PRODUCT)
    return Partition(members, near, f"a k-means partition of {cells} cells, {near.shape[1]} per vector")


@dataclasses.dataclass
class Neighbours:
    """Each vector's k closest others by cosine, best first (-inf / -1 where fewer were compared)."""

    scores: np.ndarray  # (n, k) float32
    labels: np.ndarray  # (n, k) int64
    method: str


def _compare_cell(vectors: IndexVectors, part: Partition, cell: int, k: int, scores, labels) -> None:
    """Fill the rows of one cell's members: their k closest others among the cells it is compared with."""
    own = part.members[cell]
    if len(own) == 0:
        return
    cand = np.concatenate([part.members[c] for c in part.probes[cell]])  # own members come first
    chunks = [cand[i : i + CAND_CHUNK] for i in range(0, len(cand), CAND_CHUNK)]
    cached = vectors.vectors(cand) if len(chunks) == 1 else None  # the usual case: decoded once
    for start in range(0, len(own), QUERY_ROWS):
        mine = own[start : start + QUERY_ROWS]
        q = cached[start : start + len(mine)] if cached is not None else vectors.vectors(mine)
        heap = faiss.ResultHeap(len(mine), min(k + 1, len(cand)), keep_max=True)
        for chunk in chunks:  # a huge cell (thousands of copies of one image) is read a chunk at a time
            base = cached if cached is not None else vectors.vectors(chunk)
            d, i = faiss.knn(q, base, min(k + 1, len(chunk)), metric=faiss.METRIC_INNER_PRODUCT)
            heap.add_result(
                np.ascontiguousarray(d), np.ascontiguousarray(np.where(i >= 0, chunk[np.maximum(i, 0)], -1))
            )
        heap.finalize()
        found = heap.I
        d = np.where((found == mine[:, None]) | (found < 0), -np.inf, heap.D).astype(np.float32)
        order = np.argsort(-d, axis=1, kind="stable")[:, :k]  # self dropped: the best k others
        top_d = np.take_along_axis(d, order, axis=1)
        scores[mine, : top_d.shape[1]] = top_d
        labels[mine, : top_d.shape[1]] = np.where(np.isfinite(top_d), np.take_along_axis(found, order, axis=1), -1)


def nearest_others(vectors: IndexVectors, part: Partition, k: int) -> Neighbours:
    """The k closest other vectors of every vector, among the cells its own cell is compared with."""
    n = vectors.ntotal
    scores = np.full((n, k), -np.inf, dtype=np.float32)
    labels = np.full((n, k), -1, dtype=np.int64)
    if len(part.members) == 1:  # one big cell: big products, which FAISS's own threads share well
        _compare_cell(vectors, part, 0, k, scores, labels)
        return Neighbours(scores, labels, part.method)

    def work(cell: int) -> None:
        # A cell's products are small: the threads of one call would mostly wait on each other (measured
        # 2 cores: 48 GFLOPS on one thread, 3-22 on two). One cell per thread, each single-threaded, instead.
        faiss.omp_set_num_threads(1)  # this thread's own setting
        _compare_cell(vectors, part, cell, k, scores, labels)

    with concurrent.futures.ThreadPoolExecutor(max(1, faiss.omp_get_max_threads())) as pool:
        list(pool.map(work, range(len(part.members))))  # re-raises a worker's error here
    return Neighbours(scores, labels, part.method)


def components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Union-find over edges (a[i], b[i]): each vertex's root, the smallest label of its component."""
    parent = np.arange(n, dtype=np.int64)
    a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    while True:
        while True:  # pointer jumping: every vertex points at its root
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
        ra, rb = parent[a], parent[b]
        differ = ra != rb
        if not differ.any():
            return parent
        lo, hi = np.minimum(ra[differ], rb[differ]), np.maximum(ra[differ], rb[differ])
        np.minimum.at(parent, hi, lo)  # hook the larger root under the smaller: no cycles


@dataclasses.dataclass
class DuplicateResult:
    """Groups of near-duplicates and how they were found."""

    table: pa.Table  # GROUPS_SCHEMA, largest groups first, representative first in each
    threshold: float
    info: dict  # how: threshold, auto reason, counts, timing, nearest-neighbour histogram


def _representatives(vectors: IndexVectors, groups: list[np.ndarray], degree: np.ndarray):
    """(representative label, member scores to it) per group: the medoid, or the best-linked member of big groups."""
    for members in groups:
        if len(members) <= MEDOID_MAX:
            x = vectors.vectors(members)
            sims = x @ x.T
            rep = int(np.argmax(sims.sum(axis=1)))
            yield members[rep], sims[rep]
            continue
        rep = int(np.argmax(degree[members]))
        target, step = vectors.vectors(members[rep : rep + 1])[0], max(1, BLOCK_ELEMENTS // vectors.index.d)
        blocks = [vectors.vectors(members[i : i + step]) @ target for i in range(0, len(members), step)]
        yield members[rep], np.concatenate(blocks)


def _groups_table(vectors: IndexVectors, groups: list[np.ndarray], degree: np.ndarray) -> pa.Table:
    """GROUPS_SCHEMA rows: group by group, the representative first, then the others by score."""
    labels, reps, scores = [], [], []
    for members, (rep, score) in zip(groups, _representatives(vectors, groups, degree)):
        score = np.minimum(score, 1.0).astype(np.float32)
        score[members == rep] = 1.0
        first = np.lexsort((members, -score, members != rep))
        labels.append(members[first])
        scores.append(score[first])
        reps.append(np.full(len(members), rep, dtype=np.int64))
    if not groups:
        return GROUPS_SCHEMA.empty_table()
    labels_all = pa.array(np.concatenate(labels))
    return pa.table(
        {
            "group_id": np.repeat(np.arange(len(groups), dtype=np.int64), [len(g) for g in groups]),
            "id": vectors.ids.take(labels_all),
            "uri": vectors.uris.take(labels_all),
            "score_to_representative": np.concatenate(scores),
            "representative": vectors.ids.take(pa.array(np.concatenate(reps))),
        },
        schema=GROUPS_SCHEMA,
    )


def find_duplicates(
    index_dir: str,
    *,
    threshold: float | None = None,
    probes: int = DEFAULT_PROBES,
    neighbours: int = DEFAULT_NEIGHBOURS,
    exact_max: int = EXACT_MAX,
    seed: int = 0,
) -> DuplicateResult:
    """Groups of near-duplicate images of an index directory.

    Args:
        index_dir: the output of `embedpipe index` (index.faiss, ids.parquet, index.json).
        threshold: cosine similarity at or above which two images are near-duplicates; None: choose
            it from the distribution of nearest-neighbour distances (choose_threshold).
        probes: cells each vector is compared with (its own and the nearest others).
        neighbours: closest others kept per vector (bigger groups still join through their members).
        exact_max: non-IVF indexes up to this size compare every pair.
        seed: seeds the k-means partition of non-IVF indexes.

    Raises:
        ValueError: threshold outside (-1, 1], bad options, or an index that cannot return its vectors.
    """
    if threshold is not None and not -1.0 < threshold <= 1.0:
        raise ValueError(f"--threshold is a cosine similarity in (-1, 1]; got {threshold}")
    if probes < 1 or neighbours < 1:
        raise ValueError(f"probes and neighbours must be >= 1; got {probes} and {neighbours}")
    started = time.perf_counter()
    with IndexVectors(index_dir) as vectors:
        n = vectors.ntotal
        part = partition(vectors, probes=probes, exact_max=exact_max, seed=seed)
        near = nearest_others(vectors, part, neighbours)
        choice = choose_threshold(near.scores[:, 0]) if threshold is None else None
        tau = choice.threshold if choice else float(threshold)
        hit = near.scores >= np.float32(tau)
        a = np.repeat(np.arange(n, dtype=np.int64), neighbours)[hit.ravel()]
        b = near.labels.ravel()[hit.ravel()]
        root = components(n, a, b)
        degree = np.bincount(np.concatenate([a, b]), minlength=n)
        sizes = np.bincount(root, minlength=n)
        grouped = np.flatnonzero(sizes[root] >= 2)
        order = grouped[np.lexsort((grouped, root[grouped], -sizes[root[grouped]]))]
        bounds = np.flatnonzero(np.diff(root[order])) + 1
        groups = np.split(order, bounds) if len(order) else []
        table = _groups_table(vectors, groups, degree)
        hist, edges = np.histogram(nn_distances(near.scores[:, 0]), bins=np.arange(LOG_FLOOR, 0.45, 0.1))
        lossy = any(code in str(vectors.meta.get("factory", "")) for code in ("PQ", "SQ", "LSH"))
        info = {
            "index_dir": index_dir, "factory": vectors.meta.get("factory"), "ntotal": n, "threshold": tau,
            "auto": choice is not None, "auto_clear": choice.clear if choice else None,
            "reason": choice.reason if choice else f"cos >= {tau:.5f} (--threshold)",
            "method": near.method, "neighbours": neighbours, "lossy_codes": lossy,
            "groups": len(groups), "grouped_images": len(order), "largest_groups": [len(g) for g in groups[:10]],
            "saturated": int(hit[:, -1].sum()),  # vectors with all k neighbours above the threshold: joined via others
            "nn_log10_histogram": {"edges": [round(e, 2) for e in edges.tolist()], "counts": hist.tolist()},
            "seconds": round(time.perf_counter() - started, 3),
        }  # fmt: skip
    log.info("duplicates: %d groups of %d images in %.1fs (%s)", len(groups), len(order), info["seconds"], near.method)
    return DuplicateResult(table, tau, info)
