"""ReuseUnchanged: carry forward the previous run's embedding of every unchanged image.

An image is unchanged when its id and content sha256 match a row of the previous
run (which was made with the same model fingerprint; the caller checks that).
Unchanged images are never decoded or embedded; their previous rows (vector,
embedded_at, ...) are copied verbatim. Nothing large is shuffled: the previous
run's (id -> sha256) map and the set of reused ids travel as side inputs
(~100 bytes per image), and the previous rows are streamed from their Parquet
files and filtered.
"""

from __future__ import annotations

import hashlib

import apache_beam as beam
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from pipeline.records import SourceImage


class _ReadKeysFn(beam.DoFn):
    """A previous embeddings file -> (id, content_sha256) pairs."""

    def process(self, path: str):
        with FileSystems.open(path, compression_type="uncompressed") as handle:
            table = pq.read_table(handle, columns=["id", "content_sha256"])
        yield from zip(table.column("id").to_pylist(), table.column("content_sha256").to_pylist(), strict=True)


class _SplitFn(beam.DoFn):
    """SourceImage -> itself (changed or new) or (id, sha) on output "reuse" (unchanged)."""

    def __init__(self) -> None:
        self._reused = Metrics.counter("embedpipe", "images_reused")

    def process(self, image: SourceImage, previous: dict):
        old = previous.get(image.id)
        if old is not None and old == hashlib.sha256(image.data).hexdigest():
            self._reused.inc()
            yield beam.pvalue.TaggedOutput("reuse", (image.id, old))
        else:
            yield image


class _ReadRowsFn(beam.DoFn):
    """A previous embeddings file -> its rows whose (id, sha) is in the reuse map."""

    def __init__(self, columns: list[str]) -> None:
        self._columns = columns

    def process(self, path: str, reuse: dict):
        with FileSystems.open(path, compression_type="uncompressed") as handle:
            parquet = pq.ParquetFile(handle)
            names = [c for c in self._columns if c in parquet.schema_arrow.names]
            for batch in parquet.iter_batches(batch_size=1024, columns=names):
                ids = batch.column("id").to_pylist()
                shas = batch.column("content_sha256").to_pylist()
                keep = [i for i, (k, s) in enumerate(zip(ids, shas, strict=True)) if reuse.get(k) == s]
                if not keep:
                    continue
                vectors = batch.column("embedding").flatten().to_numpy(zero_copy_only=False)
                dim = len(vectors) // max(1, batch.num_rows)
                others = {n: batch.column(n).to_pylist() for n in names if n != "embedding"}
                for i in keep:
                    row = {n: others[n][i] for n in others}
                    row["embedding"] = vectors[i * dim : (i + 1) * dim]
                    yield row


class ReuseUnchanged(beam.PTransform):
    """SourceImages -> {"changed": SourceImages to embed, "reused": previous embedding rows}.

    Args:
        previous_files: the previous run's embeddings Parquet files (may be empty).
        columns: the embeddings columns to carry (the current run's schema names).
    """

    def __init__(self, previous_files: list[str], columns: list[str]) -> None:
        super().__init__()
        self._files = list(previous_files)
        self._columns = list(columns)

    def expand(self, images):
        p = images.pipeline
        files = p | "PreviousFiles" >> beam.Create(self._files)
        keys = files | "PreviousKeys" >> beam.ParDo(_ReadKeysFn())
        split = images | "SplitUnchanged" >> beam.ParDo(_SplitFn(), beam.pvalue.AsDict(keys)).with_outputs(
            "reuse", main="changed"
        )
        reused = files | "CarryForward" >> beam.ParDo(_ReadRowsFn(self._columns), beam.pvalue.AsDict(split.reuse))
        return {"changed": split.changed, "reused": reused}
