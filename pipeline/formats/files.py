"""The `files` format: every image file under a directory or glob, one file per image.

Files are listed and read through Beam's `FileSystems`, so local paths, gs://
and s3:// take the same code path. Listing happens on a worker (not at pipeline
construction), then a reshuffle spreads the files over all workers. Ids are the
path relative to the input root, unique by construction.

Every listed file has a change marker (`change_marker`: size and last-modified
time, from the listing's `FileMetadata`, the same on local disks and gs://). A
nightly run compares it with the marker stored with the previous run's row and
skips reading files whose marker is unchanged (pipeline/reuse.py; when that is
safe: docs/DESIGN-NOTES.md, "Change markers").
"""

from __future__ import annotations

import logging
import os
import re
import time

import apache_beam as beam
from apache_beam.io.filesystem import FileMetadata, FileSystem
from apache_beam.io.filesystems import FileSystems

from pipeline import reasons, records
from pipeline.config import IMAGE_EXTENSIONS
from pipeline.formats import common
from pipeline.records import SourceImage

log = logging.getLogger(__name__)

GLOB_CHARS = "*?["

# A file modified less than this long before its bytes were read gets no marker: a later
# rewrite could land in the same timestamp tick (FAT keeps 2 s, HFS+ 1 s, ext4/XFS a kernel
# tick) with the same size and look unchanged. Such a file is read again next night.
RACY_SECONDS = 2.0


def is_image_path(path: str) -> bool:
    """True for the image extensions we embed (case-insensitive)."""
    return path.lower().endswith(IMAGE_EXTENSIONS)


def is_glob(path: str) -> bool:
    """True when `path` has a wildcard in it."""
    return any(c in path for c in GLOB_CHARS)


def resolve_input(spec: str) -> tuple[str, str]:
    """(root, glob pattern) for a directory or a glob; ids are paths relative to root."""
    spec = spec.rstrip("/") if len(spec) > 1 else spec
    if is_glob(spec):
        cut = min(spec.index(c) for c in GLOB_CHARS if c in spec)
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


def list_local(pattern: str):
    """Beam's glob semantics on the local disk, without its silent skips.

    Beam's local listing drops every entry it cannot stat (a broken link, a file
    removed mid-listing); here such an entry comes back as (path, error) so that
    the caller can make it an error row.
    """
    regex = re.compile(FileSystem.translate_pattern(pattern))
    prefix = re.match(r"^[^[*?]*", pattern).group(0)
    if prefix == pattern:  # a literal path
        candidates = [pattern] if os.path.lexists(pattern) and not os.path.isdir(pattern) else []
    else:
        top = os.path.dirname(prefix)
        candidates = (
            os.path.join(directory, name) if top else os.path.join(directory, name).removeprefix("./")
            for directory, _, names in os.walk(top or ".")
            for name in names
        )
    for path in candidates:
        if not regex.match(path):
            continue
        try:
            st = os.stat(path)  # follows links, as Beam's own listing does
        except OSError as exc:
            yield path, exc
            continue
        # Beam's LocalFileSystem fills the same fields the same way (size, getmtime).
        yield FileMetadata(path, st.st_size, st.st_mtime)


def change_marker(meta: FileMetadata) -> str | None:
    """`size=N;mtime=T` of a listed file, or None when its filesystem gives no modification time.

    Compared only for equality with the marker stored with the previous run's row: a file
    whose marker is unchanged is not read again. `T` is the listing's float seconds
    (local mtime; the object's `updated` time on gs://), written with repr so it
    round-trips exactly through the Parquet string column.
    """
    mtime = meta.last_updated_in_seconds
    if not mtime:  # Beam's FileMetadata says 0.0 where a filesystem does not know it
        return None
    return f"size={meta.size_in_bytes};mtime={float(mtime)!r}"


def trusted_marker(meta: FileMetadata, read_at: float) -> str | None:
    """The marker to store with bytes read at `read_at`, or None if the file was modified too recently.

    A rewrite after our read must change the marker; within RACY_SECONDS of the last
    modification it might not (same size, same coarse timestamp), so no marker is stored
    and the next night reads and hashes the file instead of trusting it.
    """
    marker = change_marker(meta)
    if marker is None or read_at - meta.last_updated_in_seconds < RACY_SECONDS:
        return None
    return marker


class ListFilesFn(beam.DoFn):
    """pattern -> FileMetadata of every image file under it (or an error row, output "errors").

    The FileMetadata carries size and modification time (the change marker's parts) from the
    listing itself: no extra call per file, local or gs://.
    """

    def __init__(self, root: str):
        self._root = root

    def process(self, pattern: str):
        if "://" in pattern:
            try:
                listing = FileSystems.match([pattern])[0].metadata_list
            except Exception as exc:
                raise RuntimeError(f"cannot list input {pattern!r}: {exc}") from exc
        else:
            listing = list_local(pattern)
        for entry in listing:
            if isinstance(entry, tuple):  # (path, error): there, but not readable
                path, exc = entry
                if is_image_path(path):
                    rid = relative_id(self._root, path)
                    yield beam.pvalue.TaggedOutput(
                        "errors", common.record_error(rid, path, reasons.UNREADABLE, common.describe(exc))
                    )
                continue
            if is_image_path(entry.path):
                yield entry


class ReadFileFn(beam.DoFn):
    """FileMetadata -> SourceImage (id relative to root), or an error row (output "errors").

    The SourceImage's marker is the listing's (see trusted_marker): taken before the bytes
    are read, so a change between listing and reading shows as a changed marker next night.
    """

    def __init__(self, root: str, max_bytes: int):
        self._root = root
        self._max_bytes = max_bytes

    def process(self, meta: FileMetadata):
        path = meta.path
        rid = relative_id(self._root, path)
        if meta.size_in_bytes > self._max_bytes:
            yield beam.pvalue.TaggedOutput(
                "errors",
                records.error_row(
                    rid, path, "read", reasons.TOO_LARGE, common.too_large_message(meta.size_in_bytes, self._max_bytes)
                ),
            )
            return
        read_at = time.time()
        try:
            with FileSystems.open(path, compression_type="uncompressed") as handle:
                data = handle.read(self._max_bytes + 1)
        except Exception as exc:
            yield beam.pvalue.TaggedOutput(
                "errors", records.error_row(rid, path, "read", reasons.UNREADABLE, common.describe(exc))
            )
            return
        yield SourceImage(rid, path, data, marker=trusted_marker(meta, read_at))
