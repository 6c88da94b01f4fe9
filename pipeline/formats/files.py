"""The `files` format: every image file under a directory or glob, one file per image.

Files are listed and read through Beam's `FileSystems`, so local paths, gs://
and s3:// take the same code path. Listing happens on a worker (not at pipeline
construction), then a reshuffle spreads the files over all workers. Ids are the
path relative to the input root, unique by construction.

Hostile local trees are listed without hanging or silent skips (docs/INPUT_FORMATS.md):
only regular files are handed on (a FIFO, socket or device with an image extension is
an `unreadable` row); symlinked folders are followed once, and a loop or a second path
to a folder already listed is one `unreadable` row; a name that is not UTF-8 keeps its
real path for reading but takes the escaped text of `storage.safe_text` as id and uri;
an input without a single image is an `empty_input` row that says what it held.

Every listed file has a change marker (`change_marker`: size and last-modified
time, from the listing's `FileMetadata`, the same on local disks and gs://). A
nightly run compares it with the marker stored with the previous run's row and
skips reading files whose marker is unchanged (pipeline/reuse.py; when that is
safe: docs/DESIGN-NOTES.md, "Change markers"). The marker stored with a row is the
one of the bytes actually read: from the open file's stat, not from the listing.
"""

from __future__ import annotations

import collections
import logging
import os
import re
import stat
import time
from collections.abc import Iterator

import apache_beam as beam
from apache_beam.io.filesystem import FileMetadata, FileSystem
from apache_beam.io.filesystems import FileSystems

from pipeline import reasons, records, storage
from pipeline.formats import common, detect_format
from pipeline.paths import is_glob, is_image_path
from pipeline.records import SourceImage

log = logging.getLogger(__name__)

# A file modified less than this long before its bytes were read gets no marker: a later
# rewrite could land in the same timestamp tick (FAT keeps 2 s, HFS+ 1 s, ext4/XFS a kernel
# tick) with the same size and look unchanged. Such a file is read again next night.
RACY_SECONDS = 2.0


class ListingError(OSError):
    """A folder that is not listed: a link loop, a second path to a folder already listed, or unreadable."""


def relative_id(root: str, path: str) -> str:
    """The image id: its path relative to the input root, with '/' separators, as valid text.

    The relative path is cut from the real names (which may hold undecodable bytes as lone
    surrogates), then escaped with `storage.safe_text`: `caf\\udce9.jpg` -> `caf\\\\xe9.jpg`.
    """
    if root and path.startswith(root.rstrip("/") + "/"):
        rel = path[len(root.rstrip("/")) + 1 :]
    elif root and "://" not in path and "://" not in root:
        rel = os.path.relpath(path, root)
    else:
        rel = path
    rel = rel.replace(os.sep, "/") if "://" not in rel else rel
    return storage.safe_text(rel)


def _walk(top: str, max_slashes: int | None = None) -> Iterator[str | tuple[str, ListingError]]:
    """Every non-folder path under `top`, and (folder, ListingError) for each folder not listed.

    With `max_slashes`, only folders whose path has fewer '/' than that are looked into
    (a glob without `**` cannot match deeper).

    Unlike os.walk, symlinked folders are followed, once: every folder is identified by
    (st_dev, st_ino), so a link loop or a second path to a folder already listed is
    reported instead of listed again. Real folders are walked before any link is
    followed, so a folder's own path wins over a link to it, and names are sorted, so
    the same tree always lists the same way.
    """
    try:
        st = os.stat(top)
    except OSError:
        return
    if not stat.S_ISDIR(st.st_mode):
        return
    listed = {(st.st_dev, st.st_ino): top}
    folders, links = [top], collections.deque()
    while folders or links:
        if folders:
            folder = folders.pop()
        else:
            folder = links.popleft()
            try:
                st = os.stat(folder)
            except OSError as exc:  # removed since it was seen
                yield folder, ListingError(f"cannot list folder {storage.safe_text(folder)}: {common.describe(exc)}")
                continue
            first = listed.setdefault((st.st_dev, st.st_ino), folder)
            if first != folder:
                yield folder, _repeat_error(folder, first)
                continue
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            yield folder, ListingError(f"cannot list folder {storage.safe_text(folder)}: {common.describe(exc)}")
            continue
        subfolders = []
        for entry in entries:
            path = entry.path.removeprefix("./") if folder == "." else entry.path
            try:
                if entry.is_dir(follow_symlinks=True) and max_slashes is not None and path.count("/") >= max_slashes:
                    continue  # nothing under it can match
                if entry.is_dir(follow_symlinks=False):
                    sub = entry.stat(follow_symlinks=False)
                    first = listed.setdefault((sub.st_dev, sub.st_ino), path)
                    if first != path:  # a bind mount showing a folder twice
                        yield path, _repeat_error(path, first)
                    else:
                        subfolders.append(path)
                    continue
                if entry.is_symlink() and entry.is_dir(follow_symlinks=True):
                    links.append(path)
                    continue
            except OSError:
                pass  # stat'ed again by the caller, which reports the error
            yield path
        folders.extend(reversed(subfolders))  # popped from the end: visited in name order


def _repeat_error(path: str, first: str) -> ListingError:
    target = os.path.realpath(path)
    shown = f"{storage.safe_text(path)} (-> {storage.safe_text(target)})" if os.path.islink(path) else path
    if (path + "/").startswith(first.rstrip("/") + "/"):
        what = f"a folder that contains it, {storage.safe_text(first)} (a link loop); not followed"
    else:
        what = f"the folder already listed as {storage.safe_text(first)}; its files are listed once, there"
    return ListingError(f"{storage.safe_text(shown)} is {what}")


def list_local(pattern: str) -> Iterator[FileMetadata | tuple[str, OSError]]:
    """Beam's glob semantics on the local disk, without its silent skips and hangs.

    Yields a FileMetadata per regular file matching `pattern`, and (path, error) for
    every entry that matches but cannot be read: a broken link, a file removed
    mid-listing, a FIFO, socket or device (NotRegularFileError: opening one could block
    forever), and folders `_walk` does not list (ListingError).
    """
    regex = re.compile(FileSystem.translate_pattern(pattern))
    prefix = re.match(r"^[^[*?]*", pattern).group(0)
    if prefix == pattern:  # a literal path
        candidates = [pattern] if os.path.lexists(pattern) and not os.path.isdir(pattern) else []
    else:
        deep = "**" in pattern
        candidates = _walk(os.path.dirname(prefix) or ".", None if deep else pattern.count("/"))
    for path in candidates:
        if isinstance(path, tuple):  # a folder not listed: reported whatever the pattern
            yield path
            continue
        if not regex.match(path):
            continue
        try:
            st = os.stat(path)  # follows links, as Beam's own listing does
        except OSError as exc:
            yield path, exc
            continue
        if not stat.S_ISREG(st.st_mode):
            yield path, storage.NotRegularFileError(storage.not_regular_message(path, st.st_mode))
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

    `meta` describes the bytes read (see `ReadFileFn`). A rewrite after our read must change
    the marker; within RACY_SECONDS of the last modification it might not (same size, same
    coarse timestamp), so no marker is stored and the next night reads and hashes the file
    instead of trusting it.
    """
    marker = change_marker(meta)
    if marker is None or read_at - meta.last_updated_in_seconds < RACY_SECONDS:
        return None
    return marker


class _Others:
    """What a listing held besides images, in bounded memory: counts by extension and by the format names imply."""

    MAX_GROUPS = 100  # a folder of random names must not grow this without end

    def __init__(self) -> None:
        self.files = 0
        self.groups: dict[str, list] = {}  # extension with shard numbers masked -> [first one seen, count]
        self.formats: collections.Counter = collections.Counter()

    def add(self, path: str, readable: bool = True) -> None:
        self.files += 1
        if not readable:
            return
        name = path.rstrip("/").rsplit("/", 1)[-1].lstrip(".").lower()
        ext = name[name.index(".") :] if "." in name else "(no extension)"
        # Shard numbers (-00003-of-00010) vary per file: grouped, shown as the first one found.
        key = re.sub(r"\d{3,}", "#", ext)
        if key in self.groups or len(self.groups) < self.MAX_GROUPS:
            self.groups.setdefault(key, [storage.safe_text(ext), 0])[1] += 1
        fmt = detect_format(path)
        if fmt:
            self.formats[fmt] += 1

    def message(self, pattern: str) -> str:
        """`PATTERN: N files, none with an image extension (.ext: n, ...); did you mean --input-format F?`."""
        where = storage.safe_text(pattern)
        if not self.files:
            top = pattern if not is_glob(pattern) else os.path.dirname(re.match(r"^[^[*?]*", pattern).group(0))
            gone = "://" not in pattern and top and not os.path.lexists(top)
            return f"{where}: no files at all" + (f" ({storage.safe_text(top)} does not exist)" if gone else "")
        common_few = sorted(self.groups.values(), key=lambda g: -g[1])[:3]
        shown = ", ".join(f"{ext}: {n}" for ext, n in common_few) + (", ..." if len(self.groups) > 3 else "")
        message = f"{where}: {self.files} file{'s' if self.files != 1 else ''}, none with an image extension"
        message += f" ({shown})" if shown else ""
        if self.formats:
            message += f"; did you mean --input-format {self.formats.most_common(1)[0][0]}?"
        return message


class ListFilesFn(beam.DoFn):
    """A pattern (or its index) -> FileMetadata of every image file under it, and error rows (output "errors").

    The FileMetadata carries size and modification time (the change marker's parts) from the
    listing itself: no extra call per file, local or gs://. Its path is the real one, with
    any undecodable bytes of the name as lone surrogates: FileMetadata crosses coders pickled,
    which keeps them (plain str would not cross Beam's UTF-8 coder at all), and ids and
    uris are escaped where records are made.

    With `patterns`, the DoFn holds them and its input is their index, for the same reason:
    an input path that is not UTF-8 cannot go through `beam.Create` as text. Without, the
    input is the pattern itself.
    """

    def __init__(self, root: str, patterns: list[str] | None = None):
        self._root = root
        self._patterns = list(patterns or ())

    def process(self, element: int | str):
        pattern = self._patterns[element] if isinstance(element, int) else element
        if "://" in pattern:
            try:
                listing = FileSystems.match([pattern])[0].metadata_list
            except Exception as exc:
                raise RuntimeError(f"cannot list input {pattern!r}: {exc}") from exc
        else:
            listing = list_local(pattern)
        images, others = 0, _Others()
        escaped: dict[str, str] = {}  # id -> path, for ids with a backslash: escaping could make two alike
        for entry in listing:
            path, exc = entry if isinstance(entry, tuple) else (entry.path, None)
            if not is_image_path(path) and not isinstance(exc, ListingError):
                others.add(path, readable=exc is None)
                continue
            rid = relative_id(self._root, path)
            if exc is not None:
                images += not isinstance(exc, ListingError)
                message = storage.safe_text(common.describe(exc))
                yield beam.pvalue.TaggedOutput(
                    "errors", common.record_error(rid, _uri(path), reasons.UNREADABLE, message)
                )
                continue
            images += 1
            if "\\" in rid:
                first = escaped.setdefault(rid, path)
                if first != path:
                    yield beam.pvalue.TaggedOutput("errors", _collision(rid, path, first))
                    continue
            yield entry
        if not images:
            # Not a crash (other inputs are still read), but never an empty, silent success either.
            # The id ends with '/', which no file's id does.
            yield beam.pvalue.TaggedOutput(
                "errors",
                common.record_error(
                    _uri(pattern).removesuffix("**").rstrip("/") + "/",
                    _uri(pattern),
                    reasons.EMPTY_INPUT,
                    others.message(pattern),
                ),
            )


def _uri(path: str) -> str:
    return storage.safe_text(path)


def _collision(rid: str, path: str, first: str) -> dict:
    return records.error_row(
        rid,
        _uri(path),
        "read",
        reasons.DUPLICATE_ID,
        f"id {rid!r} is also the id of {_uri(first)}, which is kept: names that are not UTF-8 are escaped "
        f"as \\xNN, and one of these two is; rename either file",
    )


class ReadFileFn(beam.DoFn):
    """FileMetadata -> SourceImage (id relative to root), or an error row (output "errors").

    Only regular files are opened (storage.read_snapshot: a file swapped for a FIFO since
    the listing is refused, never waited on), and a file that changes while it is read is
    an `unreadable` row, not a cut read. The SourceImage's marker describes the bytes read:
    it comes from the stat taken when the file was opened, not from the listing (a file
    that changed in between would otherwise carry the old marker with the new bytes and be
    trusted wrongly, or the reverse, never be trusted). See trusted_marker.
    """

    def __init__(self, root: str, max_bytes: int):
        self._root = root
        self._max_bytes = max_bytes

    def process(self, meta: FileMetadata):
        path = meta.path
        rid, uri = relative_id(self._root, path), _uri(path)
        if meta.size_in_bytes > self._max_bytes:
            message = common.too_large_message(meta.size_in_bytes, self._max_bytes)
            yield beam.pvalue.TaggedOutput("errors", records.error_row(rid, uri, "read", reasons.TOO_LARGE, message))
            return
        read_at = time.time()
        try:
            data, opened = storage.read_snapshot(path, self._max_bytes)
        except Exception as exc:
            message = storage.safe_text(common.describe(exc))
            yield beam.pvalue.TaggedOutput("errors", records.error_row(rid, uri, "read", reasons.UNREADABLE, message))
            return
        if opened is not None:  # local: what was read is what the open file's stat describes
            meta = FileMetadata(path, opened.st_size, opened.st_mtime)
        if len(data) > self._max_bytes:  # grew past the limit since the listing
            message = common.too_large_message(meta.size_in_bytes, self._max_bytes)
            yield beam.pvalue.TaggedOutput("errors", records.error_row(rid, uri, "read", reasons.TOO_LARGE, message))
            return
        yield SourceImage(rid, uri, data, marker=trusted_marker(meta, read_at))
