"""URI lists: a text, CSV or Parquet file naming images to read through Beam's FileSystems.

- text (`.txt`, `.lst`, `.list`, `.uris`): one URI per line; blank lines and lines starting with `#` skipped.
- CSV (`.csv`): columns `uri[,id]`, by header name (`uri`/`url`/`path`, or --urilist-uri-column /
  --urilist-id-column) or, without a header, by position.
- Parquet (`.parquet`, with --input-format urilist): a `uri` (or `url`) column and an optional `id` column.

A relative URI is taken relative to the list's directory. The id is the id
column where present and non-empty, otherwise the URI (normalised) relative to
the input root when it lies under it (the id the `files` format would give that
image), else the whole URI.

Listing and reading are two steps with a reshuffle of the small (id, uri) pairs
between them, so that a long list is read by all workers, not by the one that
parsed it.
"""

from __future__ import annotations

import csv
import os
import posixpath
from collections.abc import Iterator

from pipeline import reasons, storage
from pipeline.formats import common
from pipeline.formats.parquet import ColumnValues, binary_columns, row_group_problem
from pipeline.records import SourceImage

TEXT_EXTENSIONS = (".txt", ".lst", ".list", ".uris")
CSV_EXTENSIONS = (".csv",)
COMPRESSED_SUFFIXES = (".gz", ".gzip", ".bz2", ".xz")
URI_COLUMN_ALIASES = ("uri", "url", "path")
# A line holds one URI (and an id): anything longer is not an entry, and is never read whole.
MAX_LINE_BYTES = 64 * 1024
_PARQUET_BATCH = 4096
_PARQUET_FLOOR = 64 * 1024 * 1024
_PARQUET_RATIO = 256
_SKIP_CHUNK = 1 << 20


def list_kind(path: str) -> str:
    """'text', 'csv' or 'parquet' from a list file's extension (text when unknown; `.gz` etc. looked through)."""
    lower = path.lower()
    for suffix in COMPRESSED_SUFFIXES:
        lower = lower.removesuffix(suffix)
    if lower.endswith(CSV_EXTENSIONS):
        return "csv"
    if lower.endswith(".parquet"):
        return "parquet"
    return "text"


def resolve(list_path: str, uri: str) -> str:
    """A listed URI made absolute and normal: relative ones are relative to the list's directory."""
    if "://" not in uri and not uri.startswith("/"):
        base = list_path.rsplit("/", 1)[0] if "/" in list_path else ""
        uri = f"{base}/{uri}" if base else uri
    if "://" in uri:
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://{posixpath.normpath(rest)}"
    return posixpath.normpath(uri)


def uri_id(root: str, uri: str) -> str:
    """The id of a listed image without an id column: its URI relative to the input root, or the whole URI."""
    prefix = root.rstrip("/") + "/" if root else ""
    if prefix and uri.startswith(prefix):
        return uri[len(prefix) :]
    return uri


def read_list(
    path: str,
    rel: str,
    *,
    uri_column: str = "uri",
    id_column: str = "id",
) -> Iterator[tuple[str | None, str, str] | dict]:
    """(id or None, resolved uri, position) for every entry of a list file, or error rows.

    A None id means "derive it from the uri" (the caller knows the input root).
    `position` is `line=N` (1-based, text/CSV) or `row=N` (0-based, Parquet). Text and
    CSV lists may be gzip/bz2/xz-compressed (found from their first bytes); a line
    over MAX_LINE_BYTES, or one that is not UTF-8, is one `unreadable` row.
    """
    kind = list_kind(path)
    shown, rel, handle, failed = common.open_shard(path, rel, what="URI list")
    if failed:
        yield failed
        return
    with handle:
        position = "line=0" if kind != "parquet" else "row=0"
        listed = 0
        try:
            if kind == "parquet":
                entries = _parquet_entries(handle, uri_column, id_column)
            else:
                lines = _bounded_lines(storage.decompressed(handle)[0], MAX_LINE_BYTES)
                entries = _csv_entries(lines, uri_column, id_column) if kind == "csv" else _text_entries(lines)
            for position, uri, rid, problem in entries:
                if problem or not uri:
                    yield common.record_error(
                        rid or f"{rel}#{position}",
                        f"{shown}#{position}",
                        reasons.UNREADABLE,
                        problem or "entry has no URI",
                    )
                    continue
                yield rid or None, resolve(path, uri), position
                listed += 1
        except Exception as exc:
            # Nothing listed yet: the list as a whole is unreadable; otherwise it broke part way.
            yield common.shard_error(
                rel,
                shown,
                position,
                common.TRUNCATED_SHARD if listed else reasons.UNREADABLE,
                f"URI list unreadable after {position}: {common.describe(exc)}; the rest of the list could not be read",
            )


def _bounded_lines(handle, limit: int) -> Iterator[tuple[int, str | None, str | None]]:
    """(line number, text, None) per line, or (number, None, why) for a line too long or not UTF-8.

    A long line is read past in bounded pieces, never held whole: a list of a few MB
    compressed cannot become a multi-GB string.
    """
    number = 0
    while True:
        line = handle.readline(limit + 1)
        if not line:
            return
        number += 1
        if len(line) > limit and not line.endswith(b"\n"):
            size = len(line)
            while not line.endswith(b"\n"):
                line = handle.readline(_SKIP_CHUNK)
                if not line:
                    break
                size += len(line)
            yield number, None, f"line {number} has {size:,} bytes, over the {limit:,} a list line may hold; skipped"
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield number, None, f"line {number} is not UTF-8 text ({exc.reason} at byte {exc.start}); skipped"
            continue
        yield number, text.removeprefix("\ufeff") if number == 1 else text, None


def _text_entries(lines):
    for number, line, problem in lines:
        if problem:
            yield f"line={number}", "", None, problem
            continue
        line = line.strip()
        if line and not line.startswith("#"):
            yield f"line={number}", line, None, None


def _csv_entries(lines, uri_column: str, id_column: str):
    # Each line is parsed on its own: a URI entry never spans lines, and a stray quote must cost its
    # own line (an `unreadable` row), not swallow the rest of the list into one open quoted field.
    uri_at, id_at = 0, 1
    first = True
    for number, line, problem in lines:
        if problem:
            yield f"line={number}", "", None, problem
            continue
        try:
            row = next(csv.reader([line.rstrip("\r\n")], strict=True), [])
        except csv.Error as exc:
            yield f"line={number}", "", None, f"line {number} is not a CSV row ({exc}); skipped"
            continue
        cells = [c.strip() for c in row]
        if first and cells:
            first = False
            lowered = [c.lower() for c in cells]
            names = [uri_column.lower(), *URI_COLUMN_ALIASES]
            found = next((n for n in names if n in lowered), None)
            if found is not None:  # a header row
                uri_at = lowered.index(found)
                id_at = lowered.index(id_column.lower()) if id_column.lower() in lowered else None
                continue
        if not any(cells):
            continue
        uri = cells[uri_at] if uri_at < len(cells) else ""
        rid = cells[id_at] if id_at is not None and id_at < len(cells) else None
        yield f"line={number}", uri, rid, None


def _parquet_entries(handle, uri_column: str, id_column: str):
    import pyarrow.parquet as pq

    listing = pq.ParquetFile(handle)
    names = listing.schema_arrow.names
    found = next((n for n in (uri_column, *URI_COLUMN_ALIASES) if n in names), None)
    if found is None:
        raise ValueError(
            f"no URI column {uri_column!r} (columns: {', '.join(names)}); name it with --urilist-uri-column"
        )
    columns = [found] + ([id_column] if id_column in names else [])
    # Read as dictionaries: a value repeated by every row is held once and measured before it is copied.
    listing = pq.ParquetFile(
        handle, metadata=listing.metadata, read_dictionary=binary_columns(listing.schema_arrow, columns)
    )
    row = 0
    for group in range(listing.metadata.num_row_groups):
        rows = listing.metadata.row_group(group).num_rows
        # URIs compress far better than images; the bound is there for a few KB that would be gigabytes.
        problem = row_group_problem(listing.metadata, group, columns, floor=_PARQUET_FLOOR, ratio=_PARQUET_RATIO)
        if problem:
            yield f"row={row}", "", None, f"{problem}; rows {row}..{row + rows - 1} ({rows}) not listed"
            row += rows
            continue
        for batch in listing.iter_batches(batch_size=_PARQUET_BATCH, row_groups=[group], columns=columns):
            uris = ColumnValues(batch.column(found))
            ids = ColumnValues(batch.column(id_column)) if id_column in names else None
            for i in range(batch.num_rows):
                longest = max(uris.size(i) or 0, (ids.size(i) or 0) if ids is not None else 0)
                if longest > MAX_LINE_BYTES:
                    yield (
                        f"row={row}",
                        "",
                        None,
                        f"row {row} holds {longest:,} bytes, over the {MAX_LINE_BYTES:,} an entry may hold; skipped",
                    )
                else:
                    rid = ids.get(i) if ids is not None else None
                    yield f"row={row}", uris.get(i) or "", None if rid is None or rid == "" else str(rid), None
                row += 1


def read_uri(rid: str, uri: str, *, max_bytes: int) -> SourceImage | dict:
    """The bytes at one URI -> SourceImage, or an `unreadable` / `too_large` row.

    Only regular files are read (a FIFO or `/dev/zero` in a list is `unreadable`); the
    id and uri of the record are the listed ones made valid UTF-8, the open uses the URI as given.
    """
    shown_id, shown_uri = storage.safe_text(rid), storage.safe_text(uri)
    try:
        data = storage.read_bounded(uri, max_bytes)
    except storage.TooLargeError:
        return common.record_error(
            shown_id, shown_uri, reasons.TOO_LARGE, f"more than {max_bytes:,} bytes (--max-bytes)"
        )
    except Exception as exc:
        return common.record_error(shown_id, shown_uri, reasons.UNREADABLE, common.describe(exc))
    return SourceImage(shown_id, shown_uri, data)


def normalise(uri: str) -> str:
    """A URI or path in the form roots are compared in: `..` and `.` resolved, local paths absolute."""
    if "://" in uri:
        scheme, rest = uri.split("://", 1)
        return f"{scheme.lower()}://{posixpath.normpath(rest) if rest else ''}"
    return os.path.abspath(uri)


def _under(path: str, root: str) -> bool:
    root = root.rstrip("/")
    return path == root or path.startswith(root + "/")


def within_roots(uri: str, roots: tuple[str, ...]) -> bool:
    """True when `uri` lies under one of `roots` (no roots: everything is allowed).

    Compared after normalising both, component by component: `/data/x` admits
    `/data/x/a.jpg`, never `/data/xy/a.jpg`, and `..` cannot climb out. A local path
    must also stay under the root once symbolic links are resolved.
    """
    if not roots:
        return True
    target = normalise(uri)
    local = "://" not in target
    for root in roots:
        if not _under(target, normalise(root)):
            continue
        if not local or "://" in root or _under(os.path.realpath(target), os.path.realpath(normalise(root))):
            return True
    return False
