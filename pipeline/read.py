"""ReadImages: an input spec -> SourceImage records (and read-error rows).

Files are listed and read through Beam's `FileSystems`, so local paths, gs:// and
s3:// take the same code path. Listing happens on a worker (not at pipeline
construction), then a Reshuffle spreads the files over all workers.
"""

from __future__ import annotations

import logging
import os

import apache_beam as beam
from apache_beam.io.filesystem import FileMetadata
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from pipeline import reasons, records
from pipeline.config import IMAGE_EXTENSIONS
from pipeline.records import SourceImage

log = logging.getLogger(__name__)

_GLOB_CHARS = "*?["


def is_image_path(path: str) -> bool:
    """True for the image extensions we embed (case-insensitive)."""
    return path.lower().endswith(IMAGE_EXTENSIONS)


def resolve_input(spec: str) -> tuple[str, str]:
    """(root, glob pattern) for a directory or a glob; ids are paths relative to root."""
    spec = spec.rstrip("/") if len(spec) > 1 else spec
    if any(c in spec for c in _GLOB_CHARS):
        cut = min(spec.index(c) for c in _GLOB_CHARS if c in spec)
        root = spec[:cut].rsplit("/", 1)[0] if "/" in spec[:cut] else ""
        return root, spec
    if _is_single_file(spec):
        return spec.rsplit("/", 1)[0] if "/" in spec else "", spec
    return spec, f"{spec}/**"


def _is_single_file(spec: str) -> bool:
    if "://" not in spec:
        return os.path.isfile(spec)
    return is_image_path(spec)


def relative_id(root: str, path: str) -> str:
    """The image id: its path relative to the input root, with '/' separators."""
    if root and path.startswith(root.rstrip("/") + "/"):
        rel = path[len(root.rstrip("/")) + 1 :]
    elif root and "://" not in path and "://" not in root:
        rel = os.path.relpath(path, root)
    else:
        rel = path
    return rel.replace(os.sep, "/") if "://" not in rel else rel


def _walk_local(pattern: str, root: str):
    """Local listing that survives entries Beam's listing chokes on (broken links)."""
    import fnmatch

    for dirpath, _, files in os.walk(root or "."):
        for name in files:
            path = os.path.join(dirpath, name)
            if not fnmatch.fnmatch(path, pattern.replace("**", "*")):
                continue
            try:
                yield FileMetadata(path, os.path.getsize(path))
            except OSError as exc:
                yield path, exc


class _ListFn(beam.DoFn):
    """pattern -> FileMetadata of every image file under it (or an error row)."""

    def __init__(self, root: str):
        self._root = root
        self._seen = Metrics.counter("embedpipe", "images_seen")

    def process(self, pattern: str):
        try:
            listing = FileSystems.match([pattern])[0].metadata_list
        except Exception as exc:
            if "://" in pattern:
                raise RuntimeError(f"cannot list input {pattern!r}: {exc}") from exc
            log.warning("Beam could not list %s (%s); listing entry by entry", pattern, exc)
            listing = list(_walk_local(pattern, self._root))
        for entry in listing:
            if isinstance(entry, tuple):  # (path, error) from the tolerant local walk
                path, exc = entry
                if is_image_path(path):
                    self._seen.inc()
                    rid = relative_id(self._root, path)
                    yield beam.pvalue.TaggedOutput(
                        "errors",
                        records.error_row(rid, path, "read", reasons.UNREADABLE, f"{type(exc).__name__}: {exc}"),
                    )
                continue
            if is_image_path(entry.path):
                self._seen.inc()
                yield entry


class _ReadFileFn(beam.DoFn):
    def __init__(self, root: str, max_bytes: int):
        self._root = root
        self._max_bytes = max_bytes
        self._failed = Metrics.counter("embedpipe", "images_failed_read")

    def process(self, meta: FileMetadata):
        path = meta.path
        rid = relative_id(self._root, path)
        if meta.size_in_bytes > self._max_bytes:
            self._failed.inc()
            yield beam.pvalue.TaggedOutput(
                "errors",
                records.error_row(
                    rid,
                    path,
                    "read",
                    reasons.TOO_LARGE,
                    f"{meta.size_in_bytes:,} bytes exceeds the limit of {self._max_bytes:,} (--max-bytes)",
                ),
            )
            return
        try:
            with FileSystems.open(path, compression_type="uncompressed") as handle:
                data = handle.read(self._max_bytes + 1)
        except Exception as exc:
            self._failed.inc()
            yield beam.pvalue.TaggedOutput(
                "errors", records.error_row(rid, path, "read", reasons.UNREADABLE, f"{type(exc).__name__}: {exc}")
            )
            return
        yield SourceImage(rid, path, data)


class ReadImages(beam.PTransform):
    """Every image file under a directory or glob -> SourceImage ("images") + error rows ("errors")."""

    def __init__(self, spec: str, *, max_bytes: int) -> None:
        super().__init__()
        self._root, self._pattern = resolve_input(spec)
        self._max_bytes = max_bytes

    def expand(self, pbegin):
        listed = (
            pbegin
            | "InputPattern" >> beam.Create([self._pattern])
            | "ListFiles" >> beam.ParDo(_ListFn(self._root)).with_outputs("errors", main="files")
        )
        read = (
            listed.files
            | "SpreadFiles" >> beam.Reshuffle()
            | "ReadFiles" >> beam.ParDo(_ReadFileFn(self._root, self._max_bytes)).with_outputs("errors", main="images")
        )
        errors = (listed.errors, read.errors) | "ReadErrors" >> beam.Flatten()
        return {"images": read.images, "errors": errors}
