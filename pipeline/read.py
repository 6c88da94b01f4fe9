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
import dataclasses
import os

import apache_beam as beam

from pipeline.formats import FORMATS, META_FORMATS, detect_format
from pipeline.formats.files import ListFilesFn, ReadFileFn, is_glob, is_image_path, relative_id, resolve_input
from pipeline.formats.shards import CountFn, MatchShardsFn, ReadShardFn, ReadUriFn, to_wire
from pipeline.formats.tfrecord import COMPRESSIONS
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


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """What to read: paths or globs, their format, and where each format keeps ids and bytes.

    Plain data (hashable, picklable) so that it can sit in EmbedConfig and travel to workers.
    `paths` may be given as one string; it is stored as a tuple.
    """

    paths: tuple[str, ...]
    format: str = "auto"  # auto | files | tar | tfrecord | parquet | urilist
    tfrecord_key: str = "image/id"  # feature holding the id (image/id, image/filename, ...)
    tfrecord_image: str = "image/encoded"  # feature holding the encoded image
    tfrecord_compression: str = "auto"  # auto (sniffed per shard) | gzip | none
    parquet_image_column: str = "jpg"
    parquet_id_column: str = "key"
    urilist_uri_column: str = "uri"
    urilist_id_column: str = "id"
    # URI lists may name any path the worker can read; with allow_roots, only URIs under one
    # of these prefixes are read (others become `unreadable` rows). Empty: no restriction.
    allow_roots: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        paths = (self.paths,) if isinstance(self.paths, str) else tuple(self.paths)
        object.__setattr__(self, "paths", paths)
        roots = (self.allow_roots,) if isinstance(self.allow_roots, str) else tuple(self.allow_roots)
        object.__setattr__(self, "allow_roots", roots)
        if not paths or not all(isinstance(p, str) and p for p in paths):
            raise ValueError(f"input needs at least one non-empty path; got {self.paths!r}")
        if self.format not in FORMATS:
            raise ValueError(f"input format must be one of {', '.join(FORMATS)}; got {self.format!r}")
        if self.tfrecord_compression not in COMPRESSIONS:
            raise ValueError(
                f"tfrecord compression must be one of {', '.join(COMPRESSIONS)}; got {self.tfrecord_compression!r}"
            )

    @classmethod
    def of(cls, spec: str | InputSpec) -> InputSpec:
        """An InputSpec from a spec string (format auto) or an InputSpec.

        The string is one path or glob, or a comma-separated list of them (unless the
        whole string names a local file or directory: paths with commas need InputSpec).
        """
        return spec if isinstance(spec, InputSpec) else cls(paths=split_paths(spec))

    def sources(self) -> list[tuple[str, str]]:
        """(path or glob, format) per input path, with `auto` resolved from the path's name."""
        out = []
        for path in self.paths:
            fmt = self.format
            if fmt == "auto":
                # Anything without a shard extension (a directory, a glob of images) is a folder of
                # image files; a directory named like a shard (Spark's table.parquet/) holds such shards.
                fmt = detect_format(path) or "files"
            out.append((path, fmt))
        return out

    def root(self) -> str:
        """The directory ids are relative to: the common directory of every path's own root."""
        roots = [_root_of(path, fmt) for path, fmt in self.sources()]
        return _common_dir(roots)

    def ids_may_repeat(self) -> bool:
        """False only where ids are unique by construction (one `files` path): dedup can be skipped."""
        sources = self.sources()
        return len(sources) > 1 or sources[0][1] != "files"

    def carries_meta(self) -> bool:
        """True when some record can carry `meta` (tar shards): the output needs the meta column."""
        return any(fmt in META_FORMATS for _, fmt in self.sources())

    def to_dict(self) -> dict:
        """JSON-able form, for the manifest."""
        out = dataclasses.asdict(self)
        out["paths"] = list(self.paths)
        out["allow_roots"] = list(self.allow_roots)
        return out


def _root_of(path: str, fmt: str) -> str:
    """The directory a path's ids are relative to."""
    if fmt == "files" or is_glob(path):
        return resolve_input(path)[0]
    path = path.rstrip("/") if len(path) > 1 else path
    # No listing at construction time for remote paths: a name with an extension is a file.
    is_dir = os.path.isdir(path) if "://" not in path else "." not in path.rsplit("/", 1)[-1]
    if is_dir:
        return path
    return path.rsplit("/", 1)[0] if "/" in path else ""


def _common_dir(roots: list[str]) -> str:
    """Longest common '/'-separated prefix of directories (`gs://b/x`, `gs://b/y` -> `gs://b`)."""
    parts = [r.split("/") for r in roots]
    common_parts = []
    for column in zip(*parts):
        if any(c != column[0] for c in column):
            break
        common_parts.append(column[0])
    joined = "/".join(common_parts)
    if all("://" in r for r in roots) and joined.endswith(":/"):
        joined += "/"
    return joined if joined != "" or not all(r.startswith("/") for r in roots) else "/"


def split_paths(spec: str) -> tuple[str, ...]:
    """`a.tar,b/*.tar` -> ("a.tar", "b/*.tar"); a string naming an existing local path stays whole."""
    if "," not in spec or os.path.exists(spec):
        return (spec,)
    return tuple(p.strip() for p in spec.split(",") if p.strip())


def ids_may_repeat(spec: str | InputSpec) -> bool:
    """Whether the job must run DedupIds for this input (see pipeline/dedup.py)."""
    return InputSpec.of(spec).ids_may_repeat()


def carries_meta(spec: str | InputSpec) -> bool:
    """Whether embeddings of this input need the optional `meta` column."""
    return InputSpec.of(spec).carries_meta()


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
        default="image/id",
        help="tf.train.Example feature holding the image id, e.g. image/filename (default image/id; "
        "a record without it gets SHARD#INDEX)",
    )
    g.add_argument(
        "--tfrecord-image", default="image/encoded", help="feature holding the encoded image (default image/encoded)"
    )
    g.add_argument(
        "--tfrecord-compression",
        choices=COMPRESSIONS,
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
