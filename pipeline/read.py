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

import argparse

import apache_beam as beam

from pipeline.formats import FORMATS, TFRECORD_COMPRESSIONS, TFRECORD_IMAGE, TFRECORD_KEY
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
    "add_input_arguments",
    "carries_meta",
    "ids_may_repeat",
    "input_spec_from_args",
    "is_image_path",
    "relative_id",
    "resolve_input",
    "split_paths",
]


def add_input_arguments(parser: argparse.ArgumentParser) -> None:
    """Add --input-format and the per-format column/feature options (not --input itself)."""
    g = parser.add_argument_group("input format (docs/INPUT_FORMATS.md)")
    g.add_argument(
        "--input-format",
        choices=FORMATS,
        default="auto",
        help="auto (default): from each path's extension (.tar/.tar.gz, .tfrecord[.gz], .parquet, .txt/.csv; "
        "a directory or anything else is a folder of image files); files: image files under a directory or "
        "glob; tar: WebDataset shards; tfrecord: tf.train.Example shards; parquet: image bytes in a column; "
        "urilist: text/CSV/Parquet lists of image URIs",
    )
    g.add_argument(
        "--tfrecord-key",
        default=TFRECORD_KEY,
        help="tf.train.Example feature holding the image id, e.g. image/filename (default image/id; "
        "a record without it gets SHARD#INDEX)",
    )
    g.add_argument(
        "--tfrecord-image",
        default=TFRECORD_IMAGE,
        help="feature holding the encoded image (default image/encoded; img2dataset's key/jpg are found without it)",
    )
    g.add_argument(
        "--tfrecord-compression",
        choices=TFRECORD_COMPRESSIONS,
        default="auto",
        help="auto (default): detected per shard from its first bytes; gzip; none",
    )
    g.add_argument(
        "--parquet-image-column", default="jpg", help="binary column with the image bytes (default jpg, as img2dataset)"
    )
    g.add_argument(
        "--parquet-id-column",
        default="key",
        help="column with the image id (default key, as img2dataset; without it ids are SHARD#row=N)",
    )
    g.add_argument(
        "--urilist-uri-column",
        default="uri",
        help="URI column of CSV/Parquet lists (default uri; url, path also found)",
    )
    g.add_argument(
        "--urilist-id-column",
        default="id",
        help="id column of CSV/Parquet lists (default id; without it the id is the URI relative to the input root)",
    )
    g.add_argument(
        "--allow-roots",
        default="",
        metavar="PREFIXES",
        help="comma-separated path prefixes (local folders, gs://bucket/dir, ...) that URI lists may name; a listed "
        "URI outside them becomes an `unreadable` row (default: any path the worker can read, see "
        "docs/INPUT_FORMATS.md)",
    )


def input_spec_from_args(args: argparse.Namespace) -> InputSpec:
    """The InputSpec of parsed arguments: --input (a path, glob, or comma-separated list) and the options above."""
    raw = args.input
    return InputSpec(
        paths=split_paths(raw) if isinstance(raw, str) else tuple(raw),
        format=args.input_format,
        tfrecord_key=args.tfrecord_key,
        tfrecord_image=args.tfrecord_image,
        tfrecord_compression=args.tfrecord_compression,
        parquet_image_column=args.parquet_image_column,
        parquet_id_column=args.parquet_id_column,
        urilist_uri_column=args.urilist_uri_column,
        urilist_id_column=args.urilist_id_column,
        allow_roots=tuple(r.strip() for r in getattr(args, "allow_roots", "").split(",") if r.strip()),
    )


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
