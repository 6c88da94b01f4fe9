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
import io
import posixpath
from collections.abc import Iterator

from apache_beam.io.filesystems import FileSystems

from pipeline import reasons
from pipeline.formats import common
from pipeline.records import SourceImage

TEXT_EXTENSIONS = (".txt", ".lst", ".list", ".uris")
CSV_EXTENSIONS = (".csv",)
URI_COLUMN_ALIASES = ("uri", "url", "path")
_PARQUET_BATCH = 4096


def list_kind(path: str) -> str:
    """'text', 'csv' or 'parquet' from a list file's extension (text when unknown)."""
    lower = path.lower()
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
    `position` is `line=N` (1-based, text/CSV) or `row=N` (0-based, Parquet).
    """
    kind = list_kind(path)
    try:
        handle = FileSystems.open(path, compression_type="auto" if kind != "parquet" else "uncompressed")
    except Exception as exc:
        yield common.record_error(rel, path, reasons.UNREADABLE, f"cannot open URI list: {common.describe(exc)}")
        return
    with handle:
        position = "line=0" if kind != "parquet" else "row=0"
        listed = 0
        try:
            if kind == "parquet":
                entries = _parquet_entries(handle, uri_column, id_column)
            else:
                text = io.TextIOWrapper(handle, encoding="utf-8", newline="" if kind == "csv" else None)
                entries = _csv_entries(text, uri_column, id_column) if kind == "csv" else _text_entries(text)
            for position, uri, rid in entries:
                if not uri:
                    yield common.record_error(
                        rid or f"{rel}#{position}", f"{path}#{position}", reasons.UNREADABLE, "entry has no URI"
                    )
                    continue
                yield rid or None, resolve(path, uri), position
                listed += 1
        except Exception as exc:
            # Nothing listed yet: the list as a whole is unreadable; otherwise it broke part way.
            yield common.shard_error(
                rel,
                path,
                position,
                common.TRUNCATED_SHARD if listed else reasons.UNREADABLE,
                f"URI list unreadable after {position}: {common.describe(exc)}; the rest of the list could not be read",
            )


def _text_entries(text: io.TextIOBase):
    for number, line in enumerate(text, start=1):
        line = line.strip()
        if line and not line.startswith("#"):
            yield f"line={number}", line, None


def _csv_entries(text: io.TextIOBase, uri_column: str, id_column: str):
    reader = csv.reader(text)
    uri_at, id_at = 0, 1
    for number, row in enumerate(reader, start=1):
        cells = [c.strip() for c in row]
        if number == 1:
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
        yield f"line={number}", uri, rid


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
    row = 0
    for batch in listing.iter_batches(batch_size=_PARQUET_BATCH, columns=columns):
        uris = batch.column(found).to_pylist()
        ids = batch.column(id_column).to_pylist() if id_column in names else [None] * len(uris)
        for uri, rid in zip(uris, ids):
            yield f"row={row}", uri or "", None if rid is None or rid == "" else str(rid)
            row += 1


def read_uri(rid: str, uri: str, *, max_bytes: int) -> SourceImage | dict:
    """The bytes at one URI -> SourceImage, or an `unreadable` / `too_large` row."""
    try:
        with FileSystems.open(uri, compression_type="uncompressed") as handle:
            data = handle.read(max_bytes + 1)
    except Exception as exc:
        return common.record_error(rid, uri, reasons.UNREADABLE, common.describe(exc))
    if len(data) > max_bytes:
        return common.record_error(rid, uri, reasons.TOO_LARGE, f"more than {max_bytes:,} bytes (--max-bytes)")
    return SourceImage(rid, uri, data)
