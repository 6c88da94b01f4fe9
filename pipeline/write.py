"""WriteEmbeddings / WriteErrors: rows -> Parquet through Beam's file sinks.

Beam's file sinks write every shard to a temporary name and rename it into
place only when the whole write succeeds, so a failed job leaves no partial
shard behind; the job (pipeline/job.py) then publishes the staged directory.
"""

from __future__ import annotations

import apache_beam as beam
import pyarrow as pa

from pipeline.records import ERRORS_SCHEMA

# ~64 MB row groups: big enough for fast scans, small enough to stream.
ROW_GROUP_BYTES = 64 * 1024 * 1024


class _Normalise(beam.DoFn):
    """Every row gets every schema column (optional ones as None), in schema order."""

    def __init__(self, names: list[str]) -> None:
        self._names = names

    def process(self, row: dict):
        yield {name: row.get(name) for name in self._names}


class WriteParquet(beam.PTransform):
    """Rows (dicts) -> DIR/part-SSSSS-of-NNNNN.parquet with the given schema."""

    def __init__(self, directory: str, schema: pa.Schema, *, num_shards: int = 0) -> None:
        super().__init__()
        self._directory = directory.rstrip("/")
        self._schema = schema
        self._num_shards = num_shards

    def expand(self, rows):
        return (
            rows
            | "Normalise" >> beam.ParDo(_Normalise(self._schema.names))
            | "WriteToParquet"
            >> beam.io.WriteToParquet(
                f"{self._directory}/part",
                self._schema,
                file_name_suffix=".parquet",
                num_shards=self._num_shards,
                row_group_buffer_size=ROW_GROUP_BYTES,
                record_batch_size=256,
                codec="snappy",
            )
        )


class WriteEmbeddings(WriteParquet):
    """Embedding rows -> DIR/part-*.parquet (schema from records.embeddings_schema)."""


class WriteErrors(WriteParquet):
    """Error rows -> DIR/part-*.parquet (records.ERRORS_SCHEMA)."""

    def __init__(self, directory: str, *, num_shards: int = 1) -> None:
        # Errors are few: one file keeps them easy to read.
        super().__init__(directory, ERRORS_SCHEMA, num_shards=num_shards)
