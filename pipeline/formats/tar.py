"""WebDataset tar shards (plain or gzip/bz2/xz-compressed), read as a stream.

Convention (github.com/webdataset/webdataset): the members of one sample are
adjacent in the tar and share a key, the member name up to the first dot of its
basename (`dir/000123.jpg` -> key `dir/000123`, field `jpg`). The sample's
image is the member whose field is an image extension; a `json` (preferred) or
`txt` member of the same sample is carried as `meta`. Other fields are ignored.

The shard is read with `tarfile` in stream mode ('r|*') over `FileSystems.open`,
so memory holds one sample at a time whatever the shard size, and nothing
needs a seekable (or local) file.
"""

from __future__ import annotations

import logging
import tarfile
from collections.abc import Iterator

from apache_beam.io.filesystems import FileSystems

from pipeline import reasons
from pipeline.config import IMAGE_EXTENSIONS
from pipeline.formats import common
from pipeline.records import SourceImage

log = logging.getLogger(__name__)

IMAGE_FIELDS = frozenset(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)
META_FIELDS = ("json", "txt")  # in order of preference
_BUFSIZE = 1 << 20  # bytes per read from the underlying stream (tarfile's default is 10 KiB)
_MAX_META_BYTES = 1 << 20  # a meta member larger than this is not meta; it is skipped


def split_member(name: str) -> tuple[str, str]:
    """(key, field) of a member name: `a/b/000123.seg.png` -> (`a/b/000123`, `seg.png`)."""
    name = name.removeprefix("./")
    directory, _, base = name.rpartition("/")
    stem, dot, field = base.partition(".")
    key = f"{directory}/{stem}" if directory else stem
    return key, field.lower() if dot else ""


class _LastRead:
    """Proxy of tarfile's stream that remembers the last block read.

    In stream mode tarfile takes a header it cannot read (cut short, garbage,
    missing) after the first member for the end of the archive, and returns None
    as it does for a real end. A real end is a block of zeros; anything else means
    the shard was truncated or damaged there, and we must say so.
    """

    def __init__(self, stream) -> None:
        self._stream = stream
        self.last = b""

    def read(self, size=-1):
        data = self._stream.read(size)
        self.last = data
        return data

    def __getattr__(self, name):
        return getattr(self._stream, name)


class _Sample:
    """The members of one key seen so far."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.images: list[tuple[str, bytes]] = []  # (member name, bytes)
        self.too_large: list[tuple[str, int]] = []  # (member name, size)
        self.meta: dict[str, str] = {}


def read_tar(path: str, rel: str, *, max_bytes: int) -> Iterator[SourceImage | dict]:
    """Every image of one tar shard -> SourceImage (id `rel/key`, uri `path#member`) or an error row.

    Damage (a truncated or corrupt shard) yields one `truncated_shard` row with the
    byte offset (in the uncompressed tar stream) where reading stopped; every
    sample completed before it is still yielded.
    """
    try:
        handle = FileSystems.open(path, compression_type="uncompressed")
    except Exception as exc:
        yield common.record_error(rel, path, reasons.UNREADABLE, f"cannot open shard: {common.describe(exc)}")
        return
    with handle:
        try:
            archive = tarfile.open(fileobj=handle, mode="r|*", bufsize=_BUFSIZE)  # noqa: SIM115 (closed with handle)
        except Exception as exc:  # not a tar at all, empty, or damaged in the first header
            yield common.shard_error(
                rel, path, "offset=0", common.TRUNCATED_SHARD, f"not a readable tar: {common.describe(exc)}"
            )
            return
        yield from _read_members(archive, path, rel, max_bytes)


def _read_members(archive: tarfile.TarFile, path: str, rel: str, max_bytes: int) -> Iterator[SourceImage | dict]:
    stream = _LastRead(archive.fileobj)
    archive.fileobj = stream
    sample: _Sample | None = None
    reading: tarfile.TarInfo | None = None  # the member whose bytes are being read, if any
    last_name = None
    try:
        while True:
            member = archive.next()
            # Stream mode keeps every TarInfo it has seen; drop them so that memory
            # does not grow with the number of members.
            archive.members.clear()
            if member is None:
                if len(stream.last) != tarfile.BLOCKSIZE or stream.last.count(0) != tarfile.BLOCKSIZE:
                    raise tarfile.ReadError("header missing or damaged (no end-of-archive block)")
                break
            last_name = member.name
            if not member.isfile():
                continue
            key, field = split_member(member.name)
            if sample is not None and key != sample.key:
                yield from _emit(sample, path, rel, max_bytes)
                sample = None
            if field in IMAGE_FIELDS or field in META_FIELDS:
                sample = sample or _Sample(key)
                reading = member
                _take(archive, member, field, sample, max_bytes)
                reading = None
        if sample is not None:
            yield from _emit(sample, path, rel, max_bytes)
    except Exception as exc:
        # Images read whole before the damage are as good as any (tar has no data
        # checksums to offer more), so the sample in progress keeps them; the member
        # being read when the damage hit and everything after it are lost.
        if reading is not None:
            offset, where = reading.offset, f"in member {reading.name!r}"
        else:
            offset = archive.offset
            where = f"in the header after member {last_name!r}" if last_name else "in the first header"
        if sample is not None:
            yield from _emit(sample, path, rel, max_bytes)
        yield common.shard_error(
            rel,
            path,
            f"offset={offset}",
            common.TRUNCATED_SHARD,
            f"tar stream truncated or damaged at byte {offset:,} {where}: {common.describe(exc)}; "
            "the rest of the shard could not be read",
        )


def _take(archive: tarfile.TarFile, member: tarfile.TarInfo, field: str, sample: _Sample, max_bytes: int) -> None:
    """Read one member of interest into the current sample (or note why not)."""
    if field in IMAGE_FIELDS:
        if member.size > max_bytes:
            sample.too_large.append((member.name, member.size))  # tarfile skips its bytes on next()
            return
        sample.images.append((member.name, _read_member(archive, member)))
    elif member.size <= _MAX_META_BYTES and field not in sample.meta:
        sample.meta[field] = _read_member(archive, member).decode("utf-8", errors="replace")


def _read_member(archive: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    data = archive.extractfile(member).read()
    if len(data) != member.size:
        raise tarfile.ReadError(f"member {member.name!r} has {len(data):,} of its {member.size:,} bytes")
    return data


def _emit(sample: _Sample, path: str, rel: str, max_bytes: int) -> Iterator[SourceImage | dict]:
    rid = f"{rel}/{sample.key}"
    meta = next((sample.meta[f] for f in META_FIELDS if f in sample.meta), None)
    for name, data in sample.images:
        yield SourceImage(rid, f"{path}#{name}", data, meta)
    for name, size in sample.too_large:
        yield common.record_error(rid, f"{path}#{name}", reasons.TOO_LARGE, common.too_large_message(size, max_bytes))
