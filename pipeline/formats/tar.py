"""WebDataset tar shards (plain or gzip/bz2/xz-compressed), read as a stream.

Convention (github.com/webdataset/webdataset): the members of one sample are
adjacent in the tar and share a key, the member name up to the first dot of its
basename (`dir/000123.jpg` -> key `dir/000123`, field `jpg`; `dir/a.b.c.jpg` ->
key `dir/a`, field `b.c.jpg`). A field is an image when its *last* extension is an
image extension, as webdataset's decoders decide; a `json` (preferred) or `txt`
field with the same stem (the field less its last extension) is carried as `meta`,
else the sample's plain `json`/`txt`. Other fields are ignored; a sample with no
image field is one `not_an_image` row that lists its fields.

The file is opened with `storage.open_regular` (a FIFO or device named `x.tar` is
refused, never read), decompressed by `storage.decompressed` (at most the bytes
asked for per read, whatever the compression ratio) and read by `tarfile` in
plain stream mode ('r|'): memory holds one sample at a time whatever the shard
size, a member over --max-bytes is skipped in 1 MiB reads, and nothing needs a
seekable (or local) file.
"""

from __future__ import annotations

import logging
import tarfile
from collections.abc import Iterator

from pipeline import reasons, storage
from pipeline.formats import common
from pipeline.paths import IMAGE_EXTENSIONS
from pipeline.records import SourceImage

log = logging.getLogger(__name__)

IMAGE_FIELDS = frozenset(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)
META_FIELDS = ("json", "txt")  # in order of preference
_BUFSIZE = 1 << 20  # bytes per read from the decompressed stream (tarfile's default is 10 KiB)
_MAX_META_BYTES = 1 << 20  # a meta member larger than this is not meta; it is skipped
# A sample is held whole until its key changes: bounded like one image (--max-bytes) plus its meta,
# whatever its number of members, so that 200 members of one key cannot hold 200 x --max-bytes.
_MAX_SAMPLE_META_BYTES = 4 * _MAX_META_BYTES
# tarfile reads a pax or GNU long-name header whole into memory: a forged header size would be a
# memory bomb, while real ones hold a few names and numbers.
_MAX_HEADER_BYTES = 1 << 20
_HEADER_TYPES = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME)
_HEADER_TYPES += (tarfile.GNUTYPE_LONGLINK,)


def split_member(name: str) -> tuple[str, str]:
    """(key, field) of a member name: `a/b/000123.seg.png` -> (`a/b/000123`, `seg.png`); case is kept."""
    name = name.removeprefix("./")
    directory, _, base = name.rpartition("/")
    stem, dot, field = base.partition(".")
    key = f"{directory}/{stem}" if directory else stem
    return key, field if dot else ""


def field_parts(field: str) -> tuple[str, str]:
    """(stem, last extension in lower case) of a field: `b.c.JPG` -> (`b.c`, `jpg`), `jpg` -> (``, `jpg`)."""
    stem, _, ext = field.rpartition(".")
    return stem, ext.lower()


class _BoundedTarInfo(tarfile.TarInfo):
    """TarInfo that refuses headers tarfile would read whole, or loop over, when they are forged."""

    def _proc_member(self, archive):
        if self.type in _HEADER_TYPES and self.size > _MAX_HEADER_BYTES:
            raise tarfile.ReadError(
                f"an extended header of {self.size:,} bytes (over {_MAX_HEADER_BYTES:,}): not a real tar header"
            )
        if self.type == tarfile.GNUTYPE_SPARSE:  # its extension blocks chain without a bound
            raise tarfile.ReadError("GNU sparse members are not supported in shards")
        return super()._proc_member(archive)


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

    def __init__(self, key: str, first: str) -> None:
        self.key = key
        self.first = first  # name of its first member, for the uri of a sample-level row
        self.fields: list[str] = []
        self.images: list[tuple[str, str, bytes]] = []  # (member name, stem, bytes)
        self.refused: list[tuple[str, str, str, str]] = []  # (member name, stem, reason, message)
        self.meta: dict[tuple[str, str], str] = {}  # (stem, json|txt) -> text
        self.held = 0  # image bytes held
        self.meta_held = 0


def read_tar(path: str, rel: str, *, max_bytes: int) -> Iterator[SourceImage | dict]:
    """Every image of one tar shard -> SourceImage (id `rel/key`, uri `path#member`) or an error row.

    Damage (a truncated or corrupt shard) yields one `truncated_shard` row with the
    byte offset (in the decompressed tar stream) where reading stopped; every
    sample completed before it is still yielded. `path` is opened as given; ids and
    uris carry it (and member names) as text that is valid UTF-8 (storage.safe_text).
    """
    shown, rel, handle, failed = common.open_shard(path, rel)
    if failed:
        yield failed
        return
    with handle:
        try:
            stream, _ = storage.decompressed(handle)
            archive = tarfile.open(  # noqa: SIM115 (closed with handle)
                fileobj=stream, mode="r|", bufsize=_BUFSIZE, tarinfo=_BoundedTarInfo
            )
        except Exception as exc:  # not a tar at all, empty, or damaged in the first header
            yield common.shard_error(
                rel, shown, "offset=0", common.TRUNCATED_SHARD, f"not a readable tar: {common.describe(exc)}"
            )
            return
        yield from _read_members(archive, shown, rel, max_bytes)


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
            name = storage.safe_text(member.name)
            last_name = name
            key, field = split_member(name)
            if member.isdir() or not field:  # webdataset skips names without an extension too
                continue
            if sample is not None and key != sample.key:
                yield from _emit(sample, path, rel)
                sample = None
            sample = sample or _Sample(key, name)
            sample.fields.append(field)
            reading = member
            _take(archive, member, name, field, sample, max_bytes)
            reading = None
        if sample is not None:
            yield from _emit(sample, path, rel)
    except Exception as exc:
        # Images read whole before the damage are as good as any (tar has no data
        # checksums to offer more), so the sample in progress keeps them; the member
        # being read when the damage hit and everything after it are lost.
        if reading is not None:
            offset, where = reading.offset, f"in member {storage.safe_text(reading.name)!r}"
        else:
            offset = archive.offset
            where = f"in the header after member {last_name!r}" if last_name else "in the first header"
        if sample is not None:
            yield from _emit(sample, path, rel, cut=True)
        yield common.shard_error(
            rel,
            path,
            f"offset={offset}",
            common.TRUNCATED_SHARD,
            f"tar stream truncated or damaged at byte {offset:,} {where}: {common.describe(exc)}; "
            "the rest of the shard could not be read",
        )


def _not_regular(member: tarfile.TarInfo, name: str) -> str:
    """Why a member that is not a regular file is not read."""
    target = storage.safe_text(member.linkname)
    if member.issym() or member.islnk():
        kind = "symbolic" if member.issym() else "hard"
        return f"tar member {name!r} is a {kind} link to {target!r}; links inside shards are not followed"
    if member.ischr() or member.isblk():
        what = "a device"
    elif member.isfifo():
        what = "a FIFO"
    else:
        what = f"a member of tar type {member.type!r}"
    return f"tar member {name!r} is {what}, not a regular file; only regular members are read"


def _take(
    archive: tarfile.TarFile, member: tarfile.TarInfo, name: str, field: str, sample: _Sample, max_bytes: int
) -> None:
    """Read one member into the current sample (or note why not); tarfile skips what is not read."""
    stem, ext = field_parts(field)
    if not member.isfile():
        if ext in IMAGE_FIELDS:
            sample.refused.append((name, stem, reasons.UNREADABLE, _not_regular(member, name)))
        return
    if ext in IMAGE_FIELDS:
        if member.size > max_bytes:
            message = common.too_large_message(member.size, max_bytes)
            sample.refused.append((name, stem, reasons.TOO_LARGE, message))
            return
        if sample.held + member.size > max_bytes:
            message = (
                f"sample {sample.key!r} already holds {sample.held:,} bytes of images; with this member's "
                f"{member.size:,} it would exceed {max_bytes:,} (--max-bytes applies to a whole sample)"
            )
            sample.refused.append((name, stem, reasons.TOO_LARGE, message))
            return
        sample.held += member.size
        sample.images.append((name, stem, _read_member(archive, member)))
    elif (
        ext in META_FIELDS
        and member.size <= _MAX_META_BYTES
        and (stem, ext) not in sample.meta
        and sample.meta_held + member.size <= _MAX_SAMPLE_META_BYTES
    ):
        sample.meta_held += member.size
        sample.meta[(stem, ext)] = _read_member(archive, member).decode("utf-8", errors="replace")


def _read_member(archive: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    data = archive.extractfile(member).read()
    if len(data) != member.size:
        raise tarfile.ReadError(f"member {member.name!r} has {len(data):,} of its {member.size:,} bytes")
    return data


def _meta_of(sample: _Sample, stem: str) -> str | None:
    """The meta of an image: its own stem's json/txt, else the sample's plain one."""
    for wanted in dict.fromkeys((stem, "")):
        for ext in META_FIELDS:
            if (wanted, ext) in sample.meta:
                return sample.meta[(wanted, ext)]
    return None


def _emit(sample: _Sample, path: str, rel: str, *, cut: bool = False) -> Iterator[SourceImage | dict]:
    """The rows of one sample; `cut`: the shard broke inside it, so a missing image is the damage row's."""

    def rid(stem: str) -> str:
        # `rel/key` for the plain image field; a dotted one keeps its stem (`a.b.c.jpg` -> `rel/a.b.c`,
        # the key webdataset's TarWriter was given), so that two images of one sample keep apart.
        return f"{rel}/{sample.key}.{stem}" if stem else f"{rel}/{sample.key}"

    for name, stem, data in sample.images:
        yield SourceImage(rid(stem), f"{path}#{name}", data, _meta_of(sample, stem))
    for name, stem, reason, message in sample.refused:
        yield common.record_error(rid(stem), f"{path}#{name}", reason, message)
    if not sample.images and not sample.refused and not cut:
        yield common.record_error(
            rid(""),
            f"{path}#{sample.first}",
            reasons.NOT_AN_IMAGE,
            f"sample {sample.key!r} has no image member (fields: {', '.join(sample.fields)}); an image field ends "
            f"in .{', .'.join(sorted(IMAGE_FIELDS))}",
        )
