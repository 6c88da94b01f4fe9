"""Opening the user's files safely, on any Beam filesystem.

Every place that opens a path it was given (input images and shards, URI lists,
query images, weights files, index files) goes through here, so that the same
rules hold everywhere:

- **Only regular files are opened.** A local path is opened with O_NONBLOCK and
  checked with fstat before a byte is read: a FIFO, a socket or a device named
  `x.jpg` becomes `NotRegularFileError` (an `unreadable` row, or a clear error),
  never a read that blocks forever or never ends (`/dev/zero`). Object stores
  (gs://, s3://) hold nothing but regular objects.
- **Reads are bounded.** `read_bounded` reads at most `limit + 1` bytes and
  says when there was more.
- **Decompression is bounded.** `decompressed` wraps a stream in the standard
  library's gzip/bz2/xz readers, which decompress at most the bytes asked for
  per read, so a few MB of compressed zeros cost decompression time, never
  gigabytes of memory.
- **Names are text.** `safe_text` turns a name that is not valid UTF-8 (Python
  keeps the undecodable bytes as lone surrogates) into printable text with
  `\\xNN` escapes, the form ids and uris take in every record and output file.

The project's own files go through here too: atomic writes (temporary name, then a rename),
Parquet listings, replacing a run's files, removing folders, FAISS indexes on any filesystem.
"""

from __future__ import annotations

import bz2
import fcntl
import gzip
import io
import json
import logging
import lzma
import os
import shutil
import stat
import tempfile
import uuid

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

log = logging.getLogger(__name__)

# Magic numbers of the compressions a shard or a list may carry.
_MAGIC = (("gzip", b"\x1f\x8b"), ("bz2", b"BZh"), ("xz", b"\xfd7zXZ\x00"))
_OPENERS = {"gzip": gzip.GzipFile, "bz2": bz2.BZ2File, "xz": lzma.LZMAFile}
COMPRESSIONS = ("none", *_OPENERS)


class NotRegularFileError(OSError):
    """A path that names a FIFO, socket, device or directory: it is never read."""


class TooLargeError(ValueError):
    """More bytes than the limit allows."""

    def __init__(self, path: str, limit: int) -> None:
        super().__init__(f"{path}: more than {limit:,} bytes")
        self.limit = limit


class FileChangedError(OSError):
    """The file changed while it was being read: the bytes read may be a mix of two versions."""


def is_local(path: str) -> bool:
    """True for paths of the local disk (no `scheme://`)."""
    return FileSystems.get_scheme(path) is None


def kind_of(mode: int) -> str:
    """What a stat mode names, in words."""
    for test, name in (
        (stat.S_ISREG, "regular file"),
        (stat.S_ISDIR, "directory"),
        (stat.S_ISFIFO, "FIFO (named pipe)"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISLNK, "symbolic link"),
    ):
        if test(mode):
            return name
    return "special file"


def not_regular_message(path: str, mode: int) -> str:
    """The message every refusal of a non-regular file carries."""
    return f"{safe_text(path)} is a {kind_of(mode)}, not a regular file; only regular files are read"


def check_regular(path: str) -> None:
    """Raise NotRegularFileError (or OSError) unless a local path names a regular file (remote: no check)."""
    if not is_local(path):
        return
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise NotRegularFileError(not_regular_message(path, mode))


def _open_local(path: str) -> io.BufferedReader:
    # O_NONBLOCK: opening a FIFO without a writer would otherwise wait forever. It is
    # cleared again once fstat has shown a regular file (where it changes nothing anyway).
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFileError(not_regular_message(path, mode))
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        return os.fdopen(fd, "rb", buffering=1 << 20)
    except BaseException:
        os.close(fd)
        raise


def open_regular(path: str):
    """A binary read handle on a regular file (local) or an object (any other Beam filesystem).

    Raises:
        NotRegularFileError: a local FIFO, socket, device or directory.
        OSError (or the filesystem's own error): missing, unreadable.
    """
    if is_local(path):
        return _open_local(path)
    return FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED)


def read_bounded(path: str, limit: int) -> bytes:
    """All bytes of a regular file, or TooLargeError when it holds more than `limit`."""
    with open_regular(path) as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise TooLargeError(safe_text(path), limit)
    return data


def read_snapshot(path: str, limit: int) -> tuple[bytes, os.stat_result | None]:
    """(up to limit + 1 bytes, the local file's stat at open) of a file that did not change while read.

    A local file is stat'ed before and after the read: if its size or mtime moved, or
    fewer bytes came than it holds, the bytes may be half of one version and half of
    another (a file still being written), and FileChangedError says so. Objects in
    object stores are immutable per version: the stat part is None there.
    """
    if not is_local(path):
        with open_regular(path) as handle:
            return handle.read(limit + 1), None
    with _open_local(path) as handle:
        before = os.fstat(handle.fileno())
        data = handle.read(limit + 1)
        after = os.fstat(handle.fileno())
    moved = (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns)
    if moved or (len(data) <= limit and len(data) != before.st_size):
        raise FileChangedError(
            f"{safe_text(path)} changed while it was read ({before.st_size:,} bytes at open, {len(data):,} read, "
            f"{after.st_size:,} now); it is read again on the next run"
        )
    return data, before


class _Prefixed(io.RawIOBase):
    """A stream with bytes already read from its head put back in front."""

    def __init__(self, head: bytes, stream) -> None:
        self._head = head
        self._stream = stream

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        if self._head:
            n = min(len(view), len(self._head))
            view[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        data = self._stream.read(len(view))
        view[: len(data)] = data
        return len(data)


def with_head(head: bytes, stream) -> io.BufferedReader:
    """A stream that reads `head` (bytes already taken from `stream`'s start) and then the rest of `stream`."""
    return io.BufferedReader(_Prefixed(head, stream), 1 << 20)


def sniff_compression(head: bytes) -> str:
    """'gzip', 'bz2', 'xz' or 'none' from a stream's first bytes."""
    for name, magic in _MAGIC:
        if head.startswith(magic):
            return name
    return "none"


def decompressed(stream, compression: str = "auto") -> tuple[io.BufferedIOBase, str]:
    """(a binary stream of the decompressed bytes, the compression found) over a raw stream.

    `compression` is 'auto' (from the magic number), 'none', 'gzip', 'bz2' or 'xz'. The
    readers of the standard library decompress no more than each read asks for, whatever
    the compression ratio: output memory stays bounded for any input.
    """
    if compression == "auto":
        head = stream.read(6)
        compression = sniff_compression(head)
        stream = with_head(head, stream)
    if compression == "none":
        return stream, compression
    if compression not in _OPENERS:
        raise ValueError(f"compression must be one of auto, {', '.join(COMPRESSIONS)}; got {compression!r}")
    opener = _OPENERS[compression]
    return (opener(fileobj=stream) if compression == "gzip" else opener(stream)), compression


def safe_text(name: str) -> str:
    """A name as valid UTF-8 text: undecodable bytes (lone surrogates) become `\\xNN` escapes.

    Valid names are returned unchanged, so ids of ordinary files never change.
    """
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        pass
    try:
        raw = name.encode("utf-8", "surrogateescape")  # the bytes the OS gave, for names from os.fsdecode
    except UnicodeEncodeError:  # surrogates of another origin
        return name.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


# ---- writing, listing and moving the project's own files (any Beam filesystem) ----------------------


def mkdirs(path: str) -> None:
    """Create a directory (and its parents); one that exists already is fine, object stores need none."""
    try:
        FileSystems.mkdirs(path)
    except OSError:
        pass  # exists (local)
    except Exception as exc:  # Beam wraps "already exists" in BeamIOError
        if "exist" not in str(exc).lower():
            raise


def write_bytes_atomic(path: str, data: bytes) -> None:
    """Write to a temporary name beside `path`, then rename it into place.

    The rename replaces the old file in one step (os.rename locally; an object copy on gs://),
    so a reader sees the old content or the new, never a part.
    """
    if is_local(path):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with FileSystems.create(tmp) as out:
        out.write(data)
    FileSystems.rename([tmp], [path])


def write_json_atomic(path: str, payload: dict) -> None:
    """`payload` as indented, key-sorted JSON at `path`, atomically (write_bytes_atomic)."""
    write_bytes_atomic(path, json.dumps(payload, indent=2, sort_keys=True).encode())


def write_text_atomic(path: str, text: str) -> None:
    """`text` (UTF-8) at `path`, atomically (write_bytes_atomic)."""
    write_bytes_atomic(path, text.encode())


def read_text(path: str, limit: int = 16 << 20) -> str | None:
    """A small text file's content, stripped; None when it is missing or unreadable (never more than `limit` bytes)."""
    try:
        data = read_bounded(path, limit)
    except Exception:  # missing, a FIFO, too large: there is no such text
        return None
    return data.decode(errors="replace").strip()


def read_json(path: str, limit: int = 16 << 20) -> dict | None:
    """A small JSON file's content, or None when it is missing."""
    text = read_text(path, limit)
    return json.loads(text) if text else None


def parquet_files(directory: str) -> list[str]:
    """Sorted Parquet files directly under a directory (any Beam filesystem)."""
    pattern = f"{directory.rstrip('/')}/*.parquet"
    try:
        found = FileSystems.match([pattern])[0].metadata_list
    except Exception:  # Beam raises when nothing matches on some filesystems
        return []
    return sorted(m.path for m in found)


def replace_parquet_files(src: str, dst: str) -> None:
    """Replace the Parquet files directly under `dst` with those of `src` (moved, not copied).

    The new files move in first (replacing files of the same name) and only then are the old
    ones that remain deleted: a failure part way leaves every row on disk, old or new.
    """
    mkdirs(dst)
    files = parquet_files(src)
    moved = [f"{dst.rstrip('/')}/{os.path.basename(f)}" for f in files]
    if files:
        FileSystems.rename(files, moved)
    stale = sorted(set(parquet_files(dst)) - set(moved))
    if stale:
        FileSystems.delete(stale)


def remove_tree(path: str, *, best_effort: bool = False) -> None:
    """Delete a folder and everything under it (a prefix on object stores), if it exists.

    With `best_effort`, a failure is logged instead of raised (a leftover staging folder is harmless).
    """
    try:
        if is_local(path):
            if os.path.lexists(path):
                FileSystems.delete([path])
            return
        # Object stores have no folders: delete every object under the prefix, by name.
        base = path.rstrip("/")
        try:
            found = [m.path for m in FileSystems.match([f"{base}/**"])[0].metadata_list]
        except Exception:  # nothing matches
            found = []
        for i in range(0, len(found), 1000):
            FileSystems.delete(found[i : i + 1000])
        if FileSystems.exists(base):  # a filesystem with real folders keeps the empty one
            FileSystems.delete([base])
    except Exception as exc:
        if not best_effort:
            raise
        log.warning("could not remove %s: %s", safe_text(path), exc)


def file_size(path: str) -> int:
    """Size in bytes of one file on any Beam filesystem."""
    return FileSystems.match([path])[0].metadata_list[0].size_in_bytes


def write_faiss(index, path: str) -> None:
    """faiss.write_index to any Beam filesystem (remote: via a local temp file, never in memory twice)."""
    import faiss

    if is_local(path):
        faiss.write_index(index, path)
        return
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "index.faiss")
        faiss.write_index(index, local)
        with open(local, "rb") as src, FileSystems.create(path) as dst:
            shutil.copyfileobj(src, dst, 16 << 20)


def read_faiss(path: str):
    """faiss.read_index from any Beam filesystem (regular files only)."""
    import faiss

    if is_local(path):
        check_regular(path)
        return faiss.read_index(path)
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "index.faiss")
        with open_regular(path) as src, open(local, "wb") as dst:
            shutil.copyfileobj(src, dst, 16 << 20)
        return faiss.read_index(local)
