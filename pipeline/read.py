"""ReadImages: an input spec -> SourceImage records (and read-error rows).

An input is one or more paths or globs (local, gs://, s3://: anything Beam's
`FileSystems` knows) in one of these formats (docs/INPUT_FORMATS.md):

- files: image files under a directory or glob, one file per image;
- tar: WebDataset tar shards (`.tar`, `.tar.gz`), meta from `.json`/`.txt` members;
- tfrecord: TFRecord shards of `tf.train.Example` (optionally gzip'd);
- parquet: Parquet shards with image bytes in a column (img2dataset's `key`/`jpg`);
- urilist: text / CSV / Parquet lists of image URIs.

Shards are the unit of parallelism: patterns are matched on a worker, the shard
list (never the image bytes) is reshuffled over the workers, and each shard is
read as a stream (one reader per format in formats/*.py, driven by the DoFns of
formats/shards.py), so memory stays at a few records whatever the shard size.
Damage in a shard becomes error rows; the rest of the corpus goes on.

On a nightly rerun, `files` inputs are filtered right after the listing: a file
whose change marker (size + mtime) equals the previous run's is not read at all
(pipeline/reuse.py). Shards are always read; their images are matched by sha256.
"""

from __future__ import annotations

import apache_beam as beam

from pipeline.formats import FORMATS
from pipeline.formats.files import ListFilesFn, ReadFileFn, relative_id
from pipeline.formats.shards import CountFn, MatchShardsFn, ReadShardFn, ReadUriFn, to_wire
from pipeline.inputs import InputSpec, carries_meta, ids_may_repeat, split_paths
from pipeline.paths import is_image_path, resolve_input
from pipeline.progress import Tick
from pipeline.reuse import SkipUnchangedFn

__all__ = [
    "FORMATS",
    "InputSpec",
    "ReadImages",
    "carries_meta",
    "ids_may_repeat",
    "is_image_path",
    "relative_id",
    "resolve_input",
    "split_paths",
]


class ReadImages(beam.PTransform):
    """An input spec -> SourceImage ("images") + read error rows ("errors").

    Counts every record it hands on in the Beam counter embedpipe/images_seen (the
    job checks seen == embedded + reused + failed before it publishes).

    Args:
        spec: what to read.
        max_bytes: files and records above this size become `too_large` error rows.
        previous_markers: the previous run's (id, source_marker) pairs (reuse.PreviousKeys), or
            None. With them, listed files whose change marker is unchanged are not read at all:
            they go to output "unchanged" as (id, marker) (counted as seen) instead of "images".
            Shard formats have no per-image marker and are always read.
    """

    def __init__(
        self,
        spec: str | InputSpec,
        *,
        max_bytes: int,
        previous_markers: beam.PCollection | None = None,
        progress: str | None = None,
    ) -> None:
        """progress: the job's progress channel (pipeline/progress.py); listed files are counted there."""
        super().__init__()
        self._spec = InputSpec.of(spec)
        self._root = self._spec.root()
        self._max_bytes = max_bytes
        self._previous_markers = previous_markers
        self._progress = progress

    def expand(self, pbegin):
        sources = self._spec.sources()
        file_patterns = [resolve_input(path)[1] for path, fmt in sources if fmt == "files"]
        shard_sources = [(path, fmt) for path, fmt in sources if fmt != "files"]
        images, errors, outputs = [], [], {}
        if file_patterns:
            listed = (
                pbegin
                # Indices, not the patterns: a path that is not UTF-8 cannot cross beam.Create as text.
                | "InputPattern" >> beam.Create(list(range(len(file_patterns))))
                | "ListFiles" >> beam.ParDo(ListFilesFn(self._root, file_patterns)).with_outputs("errors", main="files")
            )
            # The listing is the job's total, known before any image is read.
            files = listed.files | "CountListed" >> Tick("listed", self._progress)
            if self._previous_markers is not None:
                # Before the reshuffle and the read: an unchanged file costs one listing entry, no I/O.
                skipped = files | "SkipUnchangedFiles" >> beam.ParDo(
                    SkipUnchangedFn(self._root), beam.pvalue.AsDict(self._previous_markers)
                ).with_outputs("unchanged", main="files")
                files = skipped.files
                outputs["unchanged"] = skipped.unchanged | "CountUnchanged" >> beam.ParDo(CountFn("images_seen"))
            read = (
                files
                | "SpreadFiles" >> beam.Reshuffle()
                | "ReadFiles"
                >> beam.ParDo(ReadFileFn(self._root, self._max_bytes)).with_outputs("errors", main="images")
            )
            images.append(read.images)
            errors.extend([listed.errors, read.errors])
        if shard_sources:
            matched = (
                pbegin
                # A path that is not UTF-8 crosses Beam's coders as bytes (shards.to_wire).
                | "ShardPatterns" >> beam.Create([(to_wire(path), fmt) for path, fmt in shard_sources])
                | "MatchShards" >> beam.ParDo(MatchShardsFn(self._root)).with_outputs("errors", main="shards")
            )
            shards = (
                matched.shards
                # The same shard matched by two patterns is read once.
                | "DistinctShards" >> beam.Distinct()
                | "SpreadShards" >> beam.Reshuffle()
                | "ReadShards"
                >> beam.ParDo(ReadShardFn(self._spec, self._root, self._max_bytes)).with_outputs(
                    "errors", "uris", main="images"
                )
            )
            images.append(shards.images)
            errors.extend([matched.errors, shards.errors])
            if any(fmt == "urilist" for _, fmt in shard_sources):
                fetched = (
                    shards.uris
                    | "SpreadUris" >> beam.Reshuffle()
                    | "ReadUris" >> beam.ParDo(ReadUriFn(self._max_bytes)).with_outputs("errors", main="images")
                )
                images.append(fetched.images)
                errors.append(fetched.errors)
        all_images = tuple(images) | "AllImages" >> beam.Flatten() | "CountImages" >> beam.ParDo(CountFn("images_seen"))
        all_errors = (
            tuple(errors)
            | "ReadErrors" >> beam.Flatten()
            | "CountErrors" >> beam.ParDo(CountFn("images_seen", "images_failed_read"))
        )
        return {"images": all_images, "errors": all_errors, **outputs}
