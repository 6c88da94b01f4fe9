"""BuildIndex at scale: train in the driver, add the vectors shard by shard in a Beam pipeline, merge.

1. The driver validates the dataset from its footers, draws the same seeded
   sample as the single-process build and trains the index; it writes the
   trained, empty index and the held-out queries to a staging directory.
2. A Beam pipeline (any runner) gives each Parquet file to a worker, which
   adds that file's vectors to a copy of the trained index under their global
   labels (file order + row position, known up front from the footers) and
   computes the exact top-k of the queries over that file.
3. The driver merges the shard indexes in file order with `merge_from`, so the
   inverted lists hold the same entries in the same order as a single-process
   build on the same trained index: same search results. (`merge_ondisk`
   would leave the lists in a separate .ivfdata file; index.faiss must be one
   self-contained file, see docs/INDEX.md.)
Flat and HNSW indexes gain nothing from this (flat adding is a copy; an HNSW
graph cannot be merged) and are built in one process, with a log line saying so.
"""

from __future__ import annotations

import io
import logging
import time

import apache_beam as beam
import faiss
import numpy as np
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from pipeline.config import IndexConfig
from pipeline.index.build import build_index, finish, staged
from pipeline.index.io import Dataset, IdsWriter, Shard, iter_batches, iter_columns, scan_dataset
from pipeline.index.loading import drop_precomputed_table
from pipeline.index.quality import ExactNeighbours, K
from pipeline.index.train import faiss_metric_for, ivf_of, new_index, prepare, resolve_index
from pipeline.storage import mkdirs, read_faiss, remove_tree, write_faiss

log = logging.getLogger(__name__)


def _save_npz(path: str, **arrays: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    tmp = f"{path}.tmp"
    with FileSystems.create(tmp) as out:
        out.write(buffer.getvalue())
    if FileSystems.exists(path):
        FileSystems.delete([path])
    FileSystems.rename([tmp], [path])  # a retried bundle overwrites whole files only


def _load_npz(path: str) -> dict[str, np.ndarray]:
    with FileSystems.open(path, compression_type="uncompressed") as handle:
        data = np.load(io.BytesIO(handle.read()))
        return {name: data[name] for name in data.files}


def shard_path(work: str, number: int) -> str:
    return f"{work}/shard-{number:05d}.faiss"


class AddShard(beam.DoFn):
    """(shard number, Shard) -> that file's vectors in a copy of the trained index, written to work/.

    Also writes the exact top-k of the held-out queries over the file (the recall ground truth).
    """

    def __init__(self, work: str, *, dim: int, normalize: bool, faiss_metric: int, batch_rows: int) -> None:
        self._work, self._dim, self._batch_rows = work, dim, batch_rows
        self._normalize, self._faiss_metric = normalize, faiss_metric
        self._added = Metrics.counter("embedpipe", "index_vectors_added")

    def setup(self) -> None:
        # Loaded once per worker: the trained index (centroids, OPQ, codebooks) and the queries.
        self._trained = read_faiss(f"{self._work}/trained.faiss")
        drop_precomputed_table(self._trained)  # read_index rebuilt it; the copies need none
        self._queries = _load_npz(f"{self._work}/queries.npz")["queries"]

    def process(self, element: tuple[int, Shard]):
        number, shard = element
        index = faiss.clone_index(self._trained)
        truth = ExactNeighbours(self._queries, K + 1, self._faiss_metric)
        for start, x, _ in iter_batches(shard, self._dim, self._batch_rows):
            if self._normalize:
                faiss.normalize_L2(x)
            first = shard.offset + start
            index.add_with_ids(x, np.arange(first, first + len(x), dtype=np.int64))
            truth.add(x, first)
        if index.ntotal != shard.rows:
            raise RuntimeError(f"{shard.path}: added {index.ntotal} vectors, the footer says {shard.rows}")
        write_faiss(index, shard_path(self._work, number) + ".tmp")
        if FileSystems.exists(shard_path(self._work, number)):
            FileSystems.delete([shard_path(self._work, number)])
        FileSystems.rename([shard_path(self._work, number) + ".tmp"], [shard_path(self._work, number)])
        distances, labels = truth.result()
        _save_npz(f"{self._work}/shard-{number:05d}.truth.npz", distances=distances, labels=labels)
        self._added.inc(shard.rows)
        yield number, shard.rows


def build_add_pipeline(
    ds: Dataset, work: str, options, *, normalize: bool, faiss_metric: int, batch_rows: int
) -> beam.Pipeline:
    """The pipeline (not yet run): one element per Parquet file -> work/shard-NNNNN.faiss."""
    p = beam.Pipeline(options=options)
    _ = (
        p
        | "ListShards" >> beam.Create(list(enumerate(ds.shards)))
        | "SpreadShards" >> beam.Reshuffle()  # without it, Create's single bundle runs on one worker
        | "AddShard"
        >> beam.ParDo(AddShard(work, dim=ds.dim, normalize=normalize, faiss_metric=faiss_metric, batch_rows=batch_rows))
    )
    return p


def _write_ids(ds: Dataset, path: str, batch_rows: int) -> int:
    writer = IdsWriter(path, thumbnails=ds.has_thumbnails)
    try:
        for shard in ds.shards:
            for start, batch in iter_columns(shard, ("id", "uri", "thumbnail"), batch_rows):
                writer.write(batch, shard.offset + start)
    finally:
        writer.close()
    return writer.rows


def build_index_distributed(
    embeddings: str,
    output: str,
    config: IndexConfig | None = None,
    *,
    beam_args: list[str] | None = None,
    workers: int = 1,
    batch_rows: int = 8192,
) -> dict:
    """Like build_index, with the adding done shard by shard in parallel by a Beam pipeline.

    Args:
        beam_args: pass-through Beam options (--runner, --temp_location, ...). The staging
            directory beside `output` must be readable and writable by the workers.
        workers: local worker processes (FnApiRunner multi-processing) when no runner is named.
        (other arguments: as build_index.)

    Returns:
        The content of index.json; index.faiss is the same as the single-process build's for the
        same trained index (same seed and data).
    """
    from pipeline.runner import pipeline_options

    config = config or IndexConfig()
    started = time.perf_counter()
    ds = scan_dataset(embeddings)
    index_type, factory = _kind(config, ds)
    if index_type is None:
        log.info("index: %s; building in one process", factory)
        return build_index(embeddings, output, config, batch_rows=batch_rows)
    prepared = prepare(ds, config, batch_rows=batch_rows)
    with staged(output) as staging:
        work = f"{staging}/work"
        mkdirs(work)
        write_faiss(prepared.index, f"{work}/trained.faiss")
        _save_npz(f"{work}/queries.npz", queries=prepared.queries)
        options = pipeline_options(list(beam_args or []), workers=workers)
        log.info("index: adding %d files in parallel (%d worker(s))", len(ds.shards), workers)
        result = build_add_pipeline(
            ds,
            work,
            options,
            normalize=prepared.normalized,
            faiss_metric=prepared.faiss_metric,
            batch_rows=batch_rows,
        ).run()
        result.wait_until_finish()
        merged = prepared.index
        truth = ExactNeighbours(prepared.queries, K + 1, prepared.faiss_metric)
        for number, shard in enumerate(ds.shards):  # file order = label order, as in build_index
            part = read_faiss(shard_path(work, number))
            if part.ntotal != shard.rows:
                raise RuntimeError(f"shard index of {shard.path} holds {part.ntotal} vectors, expected {shard.rows}")
            merged.merge_from(part, 0)
            found = _load_npz(f"{work}/shard-{number:05d}.truth.npz")
            truth.add_result(found["distances"], found["labels"])
        remove_tree(work, best_effort=True)
        ids_rows = _write_ids(ds, f"{staging}/ids.parquet", batch_rows)
        return finish(
            merged,
            prepared,
            ds,
            truth,
            ids_rows=ids_rows,
            staging=staging,
            output=output,
            started=started,
            recall_target=config.recall_target,
        )


def _kind(config: IndexConfig, ds: Dataset) -> tuple[str | None, str]:
    """(index type, factory) when the type can be built shard by shard, else (None, why not)."""
    index_type, factory = resolve_index(config.index_type, ds.ntotal, ds.dim, config.memory_budget_bytes)
    if ivf_of(new_index(factory, ds.dim, faiss_metric_for(index_type, config.metric))) is None:
        why = "adding to a flat index is a copy" if index_type == "flat" else "an HNSW graph cannot be merged"
        if index_type == "custom":
            why = f"{factory!r} has no inverted lists to merge"
        return None, f"{index_type} ({factory}) gains nothing from a distributed build: {why}"
    return index_type, factory
