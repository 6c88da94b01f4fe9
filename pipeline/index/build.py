"""BuildIndex: an embeddings dataset -> INDEX_DIR/{index.faiss, ids.parquet, index.json}.

Two streaming passes over the Parquet files, one record batch at a time:
1. pick a seeded random sample of row positions (training vectors plus two
   disjoint sets of held-out queries) and read just those rows (train.py);
2. add every vector to the trained index, write ids.parquet, and compute the
   exact top-k of the queries on the same batches (the ground truth for recall).
Then nprobe / efSearch is tuned on one query set and recall@10 reported on the
other (quality.py). Files are written to a staging directory beside the output
and moved into place only when whole (index.json last); `finish` and `staged`
do that for this build and for the distributed one.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import time
from collections.abc import Iterator

import faiss

from pipeline import __version__
from pipeline.config import IndexConfig
from pipeline.index.io import Dataset, IdsWriter, iter_batches, publish, scan_dataset, staging_dir
from pipeline.index.loading import FORMAT_VERSION  # what the reading side accepts
from pipeline.index.quality import ExactNeighbours, K, QuerySet, tune
from pipeline.index.train import Prepared, prepare, presize_flat_codes
from pipeline.storage import file_size, remove_tree, write_faiss, write_json_atomic

log = logging.getLogger(__name__)


@contextlib.contextmanager
def staged(output: str) -> Iterator[str]:
    """A fresh staging directory beside `output`, removed if the block fails (publish() empties it)."""
    staging = staging_dir(output)
    try:
        yield staging
    except BaseException:
        remove_tree(staging, best_effort=True)
        raise


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
    held_out = QuerySet(prepared.queries[:n_eval], truth_labels[:n_eval], prepared.eval_labels)
    tuning = QuerySet(prepared.queries[n_eval:], truth_labels[n_eval:], prepared.tune_labels)
    t_tune = time.perf_counter()
    tuned = tune(index, tuning, held_out, recall_target)
    log.info("index: tuned in %.1fs", time.perf_counter() - t_tune)
    recall = tuned.held_out.recall
    write_faiss(index, f"{staging}/index.faiss")
    meta = {
        "format_version": FORMAT_VERSION,
        "factory": prepared.factory,
        "index_type": prepared.index_type,
        "metric": prepared.metric,
        # How index.faiss compares vectors: cosine indexes use inner product, except IVF-PQ (L2 on unit
        # vectors, 2 - 2 cos); readers turn its distances into cosine similarities.
        "faiss_metric": "l2" if prepared.faiss_metric == faiss.METRIC_L2 else "inner_product",
        "normalized": prepared.normalized,
        "dim": ds.dim,
        "ntotal": int(index.ntotal),
        "model": ds.model,
        "model_config": ds.model_config,
        "source": ds.source,
        "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "build_seconds": round(time.perf_counter() - started, 3),
        "train_size": prepared.train_size,
        "search_params": tuned.params,
        "recall_at_10": round(recall, 4),
        "recall_at_10_low": round(tuned.held_out.recall_low, 4),
        "recall_queries": n_eval,
        "recall_target": recall_target,
        "recall_target_met": tuned.target_met,
        "recall_warning": tuned.warning,
        "tuning_queries": len(prepared.tune_labels),
        "tuning_curve": tuned.curve,
        "bytes": file_size(f"{staging}/index.faiss"),
        "has_thumbnails": ds.has_thumbnails,
        "embedpipe_version": __version__,
    }
    write_json_atomic(f"{staging}/index.json", meta)
    publish(staging, output)
    log.info("index: %s, %d vectors, recall@10 %.3f -> %s", prepared.factory, index.ntotal, recall, output)
    return meta


def build_index(embeddings: str, output: str, config: IndexConfig | None = None, *, batch_rows: int = 8192) -> dict:
    """Build a FAISS index of an embeddings dataset in this process.

    Args:
        embeddings: OUTPUT of `embedpipe embed` (holding embeddings/) or its embeddings/ folder.
        output: index directory to (re)place: index.faiss, ids.parquet, index.json.
        config: which index (type, metric, memory budget, seed, recall target); default IndexConfig().
        batch_rows: vectors read per record batch.

    Returns:
        The content of index.json.

    Raises:
        ValueError: empty dataset, mixed model fingerprints or dimensions, duplicate ids, a bad
            vector, or bad options.
    """
    config = config or IndexConfig()
    started = time.perf_counter()
    ds = scan_dataset(embeddings)
    prepared = prepare(ds, config, batch_rows=batch_rows)
    built = prepared.index
    presize_flat_codes(built, ds.ntotal)
    with staged(output) as staging:
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
            recall_target=config.recall_target,
        )
