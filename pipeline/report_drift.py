"""Drift between two runs of a nightly root, with bounded work on big runs.

- **Unchanged bytes, unchanged vectors.** An image with the same id and content_sha256 in two
  consecutive runs must have the same vector (reused rows are copies; a re-embedding by the same
  model fingerprint must agree). The largest relative distance |a - b| / |a| over such pairs is the
  check: it sees a vector that turned as well as one that grew or shrank (which 1 - cos misses).
- **Nearest neighbours.** For a sample of tonight's images: the distance to the nearest other
  image in tonight's index, and for the same images in the previous run's index; and the share
  whose nearest neighbour is another image than last time.

Bounds: keys (id, sha) are kept for a deterministic subset of ids (crc32 of the id, the same
subset in both runs) of at most KEY_SAMPLE per run; at most `check_sample` pairs are compared and
`nn_sample` images searched; vectors are read row group by row group, at most `read_budget` bytes
of them per run. Small runs are checked whole. The page says which.
"""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from pipeline.storage import parquet_files

DEFAULT_TOLERANCE = 1e-3  # largest |a - b| / |a| allowed between the vectors of unchanged bytes
DEFAULT_CHECK_SAMPLE = 20_000
DEFAULT_NN_SAMPLE = 2_000
DEFAULT_READ_BUDGET = 512 << 20
KEY_SAMPLE = 500_000
_HASH_SPACE = 1 << 32


@dataclasses.dataclass(frozen=True)
class _Group:
    path: str
    index: int  # row group within the file
    start: int  # position of its first row in the run (files sorted, rows in order: the index labels)
    rows: int
    bytes: int  # compressed bytes of its embedding column


class RunRows:
    """The embeddings of one run, read by position, a row group at a time."""

    def __init__(self, run_dir: str) -> None:
        """Read the Parquet footers of RUN_DIR/embeddings (nothing else yet)."""
        self.run_dir = run_dir.rstrip("/")
        self.groups: list[_Group] = []
        self.columns: set[str] = set()
        start = 0
        for path in parquet_files(f"{self.run_dir}/embeddings"):
            with FileSystems.open(path, compression_type="uncompressed") as handle:
                pf = pq.ParquetFile(handle)
                self.columns |= set(pf.schema_arrow.names)
                for g in range(pf.num_row_groups):
                    meta = pf.metadata.row_group(g)
                    size = sum(
                        meta.column(c).total_compressed_size
                        for c in range(meta.num_columns)
                        if meta.column(c).path_in_schema.split(".")[0] == "embedding"
                    )
                    self.groups.append(_Group(path, g, start, meta.num_rows, size or meta.total_byte_size))
                    start += meta.num_rows
        self.rows = start
        self._starts = np.array([g.start for g in self.groups], dtype=np.int64)

    def group_of(self, positions: np.ndarray) -> np.ndarray:
        """Index into self.groups of each position."""
        return np.searchsorted(self._starts, positions, side="right") - 1

    def keys(self, fraction: float) -> pa.Table:
        """(id, sha, position) of the rows whose id falls in the deterministic `fraction` of ids."""
        cut = int(fraction * _HASH_SPACE)
        parts = []
        for path in dict.fromkeys(g.path for g in self.groups):
            first = next(g.start for g in self.groups if g.path == path)
            with FileSystems.open(path, compression_type="uncompressed") as handle:
                offset = first
                for batch in pq.ParquetFile(handle).iter_batches(batch_size=65536, columns=["id", "content_sha256"]):
                    ids = batch.column(0).to_pylist()
                    keep = np.fromiter((zlib.crc32(i.encode("utf-8", "surrogatepass")) < cut for i in ids), bool)
                    if keep.any():
                        where = np.flatnonzero(keep)
                        parts.append(
                            pa.table(
                                {
                                    "id": batch.column(0).take(pa.array(where)),
                                    "sha": batch.column(1).take(pa.array(where)),
                                    "position": pa.array(where + offset, pa.int64()),
                                }
                            )
                        )
                    offset += len(ids)
        schema = pa.schema([("id", pa.string()), ("sha", pa.string()), ("position", pa.int64())])
        return pa.concat_tables(parts) if parts else schema.empty_table()

    def read(self, positions: np.ndarray, columns: tuple[str, ...] = ("embedding",)) -> pa.Table:
        """The named columns (those the run has) at the positions, in the order given; reads their row groups only."""
        positions = np.asarray(positions, dtype=np.int64)
        wanted = [c for c in columns if c in self.columns]
        groups = self.group_of(positions)
        parts, order = [], []
        for g in np.unique(groups):
            group = self.groups[int(g)]
            with FileSystems.open(group.path, compression_type="uncompressed") as handle:
                table = pq.ParquetFile(handle).read_row_group(group.index, columns=wanted)
            rows = np.flatnonzero(groups == g)
            parts.append(table.take(pa.array(positions[rows] - group.start)))
            order.append(rows)
        if not parts:
            return pa.table({c: pa.array([], pa.null()) for c in wanted})
        inverse = np.empty(len(positions), dtype=np.int64)
        inverse[np.concatenate(order)] = np.arange(len(positions))
        return pa.concat_tables(parts).take(pa.array(inverse))

    def find(self, ids: list[str]) -> dict[str, int]:
        """id -> position of those of the ids the run holds (scans the id column only)."""
        wanted = pa.array(sorted(set(ids)), pa.string())
        found: dict[str, int] = {}
        for path in dict.fromkeys(g.path for g in self.groups):
            offset = next(g.start for g in self.groups if g.path == path)
            with FileSystems.open(path, compression_type="uncompressed") as handle:
                for batch in pq.ParquetFile(handle).iter_batches(batch_size=65536, columns=["id"]):
                    hits = np.flatnonzero(pc.is_in(batch.column(0), value_set=wanted).to_numpy(zero_copy_only=False))
                    for row in hits:
                        found.setdefault(batch.column(0)[int(row)].as_py(), offset + int(row))
                    offset += batch.num_rows
        return found

    def vectors(self, positions: np.ndarray) -> np.ndarray:
        """float32 (len(positions), dim) vectors at the positions."""
        if len(positions) == 0:
            return np.zeros((0, 1), dtype=np.float32)
        column = self.read(positions).column("embedding").combine_chunks()
        return column.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(column), -1)


def affordable(positions: np.ndarray, run: RunRows, budget: int, rng: np.random.Generator) -> np.ndarray:
    """Mask of the positions kept when at most `budget` bytes of vectors may be read: the row
    groups holding the most of them first (ties in random order), at least one."""
    if len(positions) == 0:
        return np.zeros(0, dtype=bool)
    groups = run.group_of(positions)
    ids, counts = np.unique(groups, return_counts=True)
    if sum(run.groups[int(g)].bytes for g in ids) <= budget:
        return np.ones(len(positions), dtype=bool)
    order = np.lexsort((rng.random(len(ids)), -counts))
    chosen, spent = [], 0
    for g in ids[order]:
        size = run.groups[int(g)].bytes
        if chosen and spent + size > budget:
            continue
        chosen.append(g)
        spent += size
    return np.isin(groups, chosen)


@dataclasses.dataclass
class PairCheck:
    """Unchanged bytes between two runs and how far their vectors moved."""

    run: str
    previous: str
    status: str  # "ok", "flagged", "model changed", "nothing in common"
    unchanged: int  # pairs (same id and sha) found, estimated for the whole run when keys are sampled
    checked: int
    max_cos_distance: float | None = None
    max_relative_l2: float | None = None
    worst: list[tuple[str, float]] = dataclasses.field(default_factory=list)
    sampled: bool = False


@dataclasses.dataclass
class Sample:
    """Tonight's sample: keys joined with the previous run's, and the budgets."""

    pairs: pa.Table  # id, sha, position, sha_prev, position_prev (inner join on id)
    tonight_only: pa.Table  # id, sha, position of sampled ids not in the previous run
    fraction: float


def joined_keys(run: RunRows, previous: RunRows | None) -> Sample:
    """Keys of both runs for the same deterministic subset of ids, joined on id (no previous: no pairs)."""
    fraction = min(1.0, KEY_SAMPLE / max(1, run.rows, previous.rows if previous else 0))
    mine = run.keys(fraction)
    if previous is None:
        theirs = pa.table({"id": pa.array([], pa.string()), "sha_prev": pa.array([], pa.string()),
                           "position_prev": pa.array([], pa.int64())})  # fmt: skip
    else:
        theirs = previous.keys(fraction).rename_columns(["id", "sha_prev", "position_prev"])
    pairs = mine.join(theirs, "id", join_type="inner").sort_by("position")
    alone = mine.join(theirs, "id", join_type="left anti").sort_by("position")
    return Sample(pairs, alone, fraction)


def check_unchanged(
    run: RunRows,
    previous: RunRows,
    sample: Sample,
    *,
    names: tuple[str, str],
    tolerance: float = DEFAULT_TOLERANCE,
    check_sample: int = DEFAULT_CHECK_SAMPLE,
    read_budget: int = DEFAULT_READ_BUDGET,
    seed: int = 0,
) -> PairCheck:
    """Compare the vectors of images whose bytes did not change between the runs."""
    pairs = sample.pairs
    same = np.asarray(pairs.column("sha").to_pylist(), dtype=object) == np.asarray(
        pairs.column("sha_prev").to_pylist(), dtype=object
    )
    mine = pairs.column("position").to_numpy()[same]
    theirs = pairs.column("position_prev").to_numpy()[same]
    ids = np.asarray(pairs.column("id").to_pylist(), dtype=object)[same]
    unchanged = round(len(mine) / sample.fraction)
    if len(mine) == 0:
        return PairCheck(names[0], names[1], "nothing in common", 0, 0)
    rng = np.random.default_rng(seed)
    keep = np.zeros(len(mine), dtype=bool)
    keep[rng.choice(len(mine), size=min(check_sample, len(mine)), replace=False)] = True
    keep[keep] = affordable(mine[keep], run, read_budget, rng)
    keep[keep] = affordable(theirs[keep], previous, read_budget, rng)
    a, b = run.vectors(mine[keep]), previous.vectors(theirs[keep])
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    safe = np.where((na > 0) & (nb > 0), na * nb, 1.0)
    cos_distance = 1.0 - np.einsum("ij,ij->i", a, b) / safe
    relative = np.linalg.norm(a - b, axis=1) / np.where(na > 0, na, 1.0)
    worst = np.argsort(-relative, kind="stable")[:5]
    max_relative = float(relative.max()) if len(relative) else 0.0
    return PairCheck(
        run=names[0],
        previous=names[1],
        status="flagged" if max_relative > tolerance else "ok",
        unchanged=unchanged,
        checked=int(keep.sum()),
        max_cos_distance=float(cos_distance.max()) if len(cos_distance) else 0.0,
        max_relative_l2=max_relative,
        worst=[(str(ids[keep][i]), float(relative[i])) for i in worst if relative[i] > tolerance],
        sampled=bool(sample.fraction < 1.0 or keep.sum() < len(mine)),
    )


@dataclasses.dataclass
class NeighbourDrift:
    """Distances to the nearest neighbour, tonight and last time, for a sample of tonight's images."""

    tonight: np.ndarray  # log10 distance per sampled image
    previous: np.ndarray  # log10 distance for those of them in the previous run
    compared: int  # images whose nearest neighbour was looked up in both runs
    changed: int  # ... and is another image than last time
    sampled_of: int  # images in tonight's run
    metric: str
    previous_run: str | None = None


def _nearest_other(index_dir: str, ids: list[str], vectors: np.ndarray) -> tuple[np.ndarray, list[str | None], str]:
    """(log10 distance to the nearest other item, its id, metric) of each query, via the run's index."""
    from pipeline.index.search import Searcher

    with Searcher.open(index_dir) as searcher:
        metric = searcher.meta["metric"]
        distances, nearest = [], []
        k = min(3, searcher.ntotal)
        for start in range(0, len(ids), 256):  # batched: bounded memory whatever the sample
            hits = searcher.search_vectors(vectors[start : start + 256], k=k)
            for own, row in zip(ids[start : start + 256], hits):
                other = next((h for h in row if h.id != own), None)
                nearest.append(other.id if other else None)
                if other is None:
                    distances.append(np.nan)
                else:
                    value = 1.0 - other.score if metric == "cosine" else other.score
                    distances.append(np.log10(max(value, 1e-7)))
    return np.asarray(distances, dtype=np.float64), nearest, metric


def neighbour_drift(
    run: RunRows,
    previous: RunRows | None,
    sample: Sample,
    *,
    nn_sample: int = DEFAULT_NN_SAMPLE,
    read_budget: int = DEFAULT_READ_BUDGET,
    seed: int = 0,
) -> NeighbourDrift:
    """Nearest-neighbour distances of a sample of tonight's images in both runs' indexes."""
    rng = np.random.default_rng(seed + 1)
    ids = np.asarray(sample.pairs.column("id").to_pylist() + sample.tonight_only.column("id").to_pylist(), object)
    mine = np.concatenate(
        [sample.pairs.column("position").to_numpy(), sample.tonight_only.column("position").to_numpy()]
    ).astype(np.int64)
    theirs = np.concatenate(
        [sample.pairs.column("position_prev").to_numpy(), np.full(sample.tonight_only.num_rows, -1)]
    ).astype(np.int64)
    pick = np.sort(rng.choice(len(mine), size=min(nn_sample, len(mine)), replace=False)) if len(mine) else []
    ids, mine, theirs = ids[pick], mine[pick], theirs[pick]
    keep = affordable(mine, run, read_budget, rng)
    ids, mine, theirs = ids[keep], mine[keep], theirs[keep]
    if len(ids) == 0:
        return NeighbourDrift(np.zeros(0), np.zeros(0), 0, 0, run.rows, "cosine")
    tonight, nn_tonight, metric = _nearest_other(f"{run.run_dir}/index", list(ids), run.vectors(mine))
    both = theirs >= 0
    both[both] = affordable(theirs[both], previous, read_budget, rng)
    before, nn_before = np.zeros(0), []
    if both.any():
        before, nn_before, _ = _nearest_other(
            f"{previous.run_dir}/index", list(ids[both]), previous.vectors(theirs[both])
        )
    after = [nn for nn, b in zip(nn_tonight, both) if b]
    changed = sum(1 for x, y in zip(after, nn_before) if x != y)
    return NeighbourDrift(
        tonight=tonight[np.isfinite(tonight)],
        previous=before[np.isfinite(before)],
        compared=int(both.sum()),
        changed=changed,
        sampled_of=run.rows,
        metric=metric,
    )
