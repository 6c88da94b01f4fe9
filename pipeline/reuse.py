"""ReuseUnchanged: carry forward the previous run's embedding of every unchanged image.

An image is unchanged when its id matches a row of the previous run (which was
made with the same model fingerprint; the caller checks that) and either

- its change marker matches the row's `source_marker` (files only: size and
  modification time from the listing, see formats/files.py): the file is not
  even opened, `SkipUnchangedFn` routes it away right after the listing; or
- its content sha256 matches the row's `content_sha256` (every format, and
  files whose marker differs or is missing, e.g. touched but identical).

Unchanged images are never decoded or embedded; their previous rows (vector,
embedded_at, ...) are copied verbatim, except `source_marker`, which becomes the
file's current marker. Nothing large is shuffled: the previous run's (id -> sha256)
and (id -> marker) maps and the map of reused ids travel as side inputs (~100
bytes per image each), and the previous rows are streamed from their Parquet
files and filtered.
"""

from __future__ import annotations

import hashlib

import apache_beam as beam
import pyarrow.parquet as pq
from apache_beam.io.filesystem import FileMetadata
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from pipeline.formats.files import change_marker, relative_id
from pipeline.records import SourceImage

MARKER_COLUMN = "source_marker"


class _ReadKeysFn(beam.DoFn):
    """A previous embeddings file -> (id, sha256), and (id, marker) on "markers" where the row has one."""

    def process(self, path: str):
        with FileSystems.open(path, compression_type="uncompressed") as handle:
            parquet = pq.ParquetFile(handle)
            # Runs made before markers existed have no marker column: their files are read and hashed.
            has_marker = MARKER_COLUMN in parquet.schema_arrow.names
            columns = ["id", "content_sha256", MARKER_COLUMN] if has_marker else ["id", "content_sha256"]
            table = parquet.read(columns=columns)
        ids = table.column("id").to_pylist()
        yield from zip(ids, table.column("content_sha256").to_pylist(), strict=True)
        if has_marker:
            for rid, marker in zip(ids, table.column(MARKER_COLUMN).to_pylist(), strict=True):
                if marker is not None:
                    yield beam.pvalue.TaggedOutput("markers", (rid, marker))


class PreviousKeys(beam.PTransform):
    """The previous run's embeddings files -> {"shas": (id, sha256), "markers": (id, source_marker)}.

    Only the small key columns are read; "markers" holds only rows that have a marker.
    """

    def __init__(self, previous_files: list[str]) -> None:
        super().__init__()
        self._files = list(previous_files)

    def expand(self, pbegin):
        keys = (
            pbegin
            | "PreviousFiles" >> beam.Create(self._files)
            | "ReadKeys" >> beam.ParDo(_ReadKeysFn()).with_outputs("markers", main="shas")
        )
        return {"shas": keys.shas, "markers": keys.markers}


class SkipUnchangedFn(beam.DoFn):
    """FileMetadata -> itself (to be read), or (id, marker) on output "unchanged" when its marker is the previous row's.

    Runs on the listing, before any byte of the file is read. Side input: the previous
    run's (id -> source_marker) map. The id is relative_id's, escaped text for a name
    that is not UTF-8, the same that ReadFileFn gave the stored row, so such a file is
    matched by its marker like any other.
    """

    def __init__(self, root: str) -> None:
        self._root = root

    def setup(self) -> None:
        self._reused = Metrics.counter("embedpipe", "images_reused")
        self._by_marker = Metrics.counter("embedpipe", "images_reused_by_marker")

    def process(self, meta: FileMetadata, previous: dict):
        rid = relative_id(self._root, meta.path)
        old = previous.get(rid)
        if old is not None and old == change_marker(meta):
            self._reused.inc()
            self._by_marker.inc()
            yield beam.pvalue.TaggedOutput("unchanged", (rid, old))
        else:
            yield meta


class _SplitFn(beam.DoFn):
    """SourceImage -> itself (changed or new) or (id, (sha, marker)) on output "reuse" (unchanged)."""

    def setup(self) -> None:
        self._reused = Metrics.counter("embedpipe", "images_reused")

    def process(self, image: SourceImage, previous: dict):
        old = previous.get(image.id)
        if old is not None and old == hashlib.sha256(image.data).hexdigest():
            self._reused.inc()
            # The row keeps the file's current marker (a touched file gets its new mtime), so
            # that the next night skips it without reading.
            yield beam.pvalue.TaggedOutput("reuse", (image.id, (old, image.marker)))
        else:
            yield image


class _ReadRowsFn(beam.DoFn):
    """A previous embeddings file -> its rows that are reused, each with the file's current marker.

    Side input: id -> [(sha256 or None, marker), ...], one claim per copy of the image read
    this run. A row is emitted per claim whose sha256 (hash reuse) or marker (marker reuse,
    sha None) is the one the claim was made on.
    """

    def __init__(self, columns: list[str]) -> None:
        self._columns = list(columns)

    def process(self, path: str, reuse: dict):
        with FileSystems.open(path, compression_type="uncompressed") as handle:
            parquet = pq.ParquetFile(handle)
            present = parquet.schema_arrow.names
            names = [c for c in self._columns if c in present]
            has_marker = MARKER_COLUMN in present
            for batch in parquet.iter_batches(batch_size=1024, columns=names):
                ids = batch.column("id").to_pylist()
                shas = batch.column("content_sha256").to_pylist()
                markers = batch.column(MARKER_COLUMN).to_pylist() if has_marker else [None] * len(ids)
                # One row per claim: an id read twice (the same key in two shards) is claimed
                # twice and carried twice, and DedupIds downstream turns the second copy into
                # a duplicate_id error, as on the night it was first embedded.
                keep = [
                    (i, claim[1])
                    for i, rid in enumerate(ids)
                    for claim in reuse.get(rid, ())
                    if (claim[0] == shas[i] if claim[0] is not None else claim[1] == markers[i])
                ]
                if not keep:
                    continue
                vectors = batch.column("embedding").flatten().to_numpy(zero_copy_only=False)
                dim = len(vectors) // max(1, batch.num_rows)
                others = {n: batch.column(n).to_pylist() for n in names if n != "embedding"}
                for i, marker in keep:
                    row = {n: others[n][i] for n in others}
                    row["embedding"] = vectors[i * dim : (i + 1) * dim]
                    row[MARKER_COLUMN] = marker
                    yield row


class ReuseUnchanged(beam.PTransform):
    """SourceImages -> {"changed": SourceImages to embed, "reused": previous embedding rows}.

    Args:
        previous_files: the previous run's embeddings Parquet files (may be empty).
        columns: the embeddings columns to carry (the current run's schema names).
        previous_shas: the previous run's (id, sha256) pairs (PreviousKeys()["shas"]).
        unchanged: (id, marker) of files ReadImages skipped because their marker was unchanged
            (ReadImages(...)["unchanged"]), or None; their rows are carried forward too.
    """

    def __init__(
        self,
        previous_files: list[str],
        columns: list[str],
        *,
        previous_shas: beam.PCollection,
        unchanged: beam.PCollection | None = None,
    ) -> None:
        super().__init__()
        self._files = list(previous_files)
        self._columns = list(columns)
        self._shas = previous_shas
        self._unchanged = unchanged

    def expand(self, images):
        p = images.pipeline
        split = images | "SplitUnchanged" >> beam.ParDo(_SplitFn(), beam.pvalue.AsDict(self._shas)).with_outputs(
            "reuse", main="changed"
        )
        claims = split.reuse
        if self._unchanged is not None:
            by_marker = self._unchanged | "MarkerClaims" >> beam.Map(lambda kv: (kv[0], (None, kv[1])))
            claims = (claims, by_marker) | "AllClaims" >> beam.Flatten()
        files = p | "PreviousFiles" >> beam.Create(self._files)
        # Grouped, then a plain dict side input (loaded once per worker), rather than a
        # multimap side input, which would look each id up through the runner's state API.
        grouped = claims | "GroupClaims" >> beam.GroupByKey() | "ClaimLists" >> beam.MapTuple(lambda k, v: (k, list(v)))
        reused = files | "CarryForward" >> beam.ParDo(_ReadRowsFn(self._columns), beam.pvalue.AsDict(grouped))
        return {"changed": split.changed, "reused": reused}
