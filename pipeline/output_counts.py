"""Counting what a run wrote: rows in Parquet footers, rows stamped by this run, errors by reason, Beam counters.

The job checks seen == embedded + reused + failed from these before it publishes anything.
"""

from __future__ import annotations

import collections
import datetime

import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.runners.runner import PipelineResult

from pipeline import reasons
from pipeline.storage import parquet_files


def count_rows(directory: str) -> int:
    """Rows in all Parquet files of a directory, from the footers only."""
    total = 0
    for path in parquet_files(directory):
        with FileSystems.open(path, compression_type="uncompressed") as handle:
            total += pq.ParquetFile(handle).metadata.num_rows
    return total


def count_stamped(directory: str, embedded_at: datetime.datetime) -> int:
    """Rows in a run's embeddings stamped with this run's `embedded_at` (embedded, not reused)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    total = 0
    for path in parquet_files(directory):
        with FileSystems.open(path, compression_type="uncompressed") as handle:
            column = pq.read_table(handle, columns=["embedded_at"]).column("embedded_at")
        total += pc.sum(pc.equal(column, pa.scalar(embedded_at, type=column.type))).as_py() or 0
    return total


def error_summary(directory: str, *, max_empty: int = 20) -> tuple[dict[str, int], list[str]]:
    """(error code -> count, the messages of up to `max_empty` empty_input rows) over errors/*.parquet."""
    counts: collections.Counter = collections.Counter()
    empty: list[str] = []
    for path in parquet_files(directory):
        with FileSystems.open(path, compression_type="uncompressed") as handle:
            table = pq.read_table(handle, columns=["error", "message"])
        codes = table.column("error").to_pylist()
        counts.update(codes)
        if reasons.EMPTY_INPUT in counts and len(empty) < max_empty:
            messages = table.column("message").to_pylist()
            empty += [m for c, m in zip(codes, messages) if c == reasons.EMPTY_INPUT][: max_empty - len(empty)]
    return dict(sorted(counts.items())), sorted(empty)


def beam_counter(result: PipelineResult, name: str) -> int | None:
    """The committed (else attempted) total of the embedpipe/<name> counter of a pipeline result; None if unset."""
    found = result.metrics().query(MetricsFilter().with_namespace("embedpipe").with_name(name))["counters"]
    if not found:
        return None
    values = [c.committed if c.committed is not None else c.attempted for c in found]
    return int(sum(v for v in values if v is not None))
