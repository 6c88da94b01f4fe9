"""Parquet shards with the image bytes in a column (img2dataset's layout: `key`, `jpg`).

img2dataset keeps a row for every URL it was given, also the ones it could not fetch:
those have a `status` other than "success" and an `error_message`, and no image. A
shard with both of those text columns is read with them: such a row is one
`source_failed` row carrying the shard's status and message (docs/INPUT_FORMATS.md).

Read one row group at a time in small record batches, so memory holds a batch of
images and the row group's pages, never the whole shard. A row group that fails to
read becomes one error row for its rows and the next row group is still read.

A small Parquet file can describe gigabytes: a page of compressed zeros, or one
dictionary value repeated by every row. pyarrow materialises what it decodes, so
before a row group is decoded its footer sizes are checked (`row_group_problem`),
binary columns are read as dictionaries (a repeated value is held once, and its
size is known before it is copied out), and the bytes one row group hands out are
bounded the same way. Such a row group is one `too_large` row that says so.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import reasons, storage
from pipeline.formats import common
from pipeline.records import SourceImage

BATCH_ROWS = 16  # images per record batch: a few MB for typical photos
# A row group may decompress to at most the larger of FLOOR and RATIO times its size on disk
# (measured: pyarrow holds 2-3x what it decompresses). Photos (JPEG, PNG, WebP) barely
# compress, so real row groups of any size pass the ratio; a few KB that would become
# gigabytes do not.
ROW_GROUP_FLOOR = 16 * 1024 * 1024
MAX_RATIO = 32
MAX_ID_BYTES = common.MAX_ID_BYTES
# img2dataset's per-row outcome (its downloader's schema: `status`, `error_message`, both pa.string()).
STATUS_COLUMN, MESSAGE_COLUMN, SUCCESS = "status", "error_message", "success"
MAX_SOURCE_TEXT = 1024  # bytes of a status or error_message copied into our message; a longer one is cut


def row_group_problem(
    metadata: pq.FileMetaData, group: int, columns: list[str], *, floor: int = ROW_GROUP_FLOOR, ratio: int = MAX_RATIO
) -> str | None:
    """Why a row group must not be decoded (it would decompress far beyond its size on disk), or None.

    Read from the footer, before any page is: the sizes of the column chunks of `columns`.
    """
    meta = metadata.row_group(group)
    chunks = [meta.column(i) for i in range(meta.num_columns)]
    chunks = [c for c in chunks if c.path_in_schema.split(".", 1)[0] in columns]
    packed = sum(c.total_compressed_size for c in chunks)
    unpacked = sum(c.total_uncompressed_size for c in chunks)
    limit = decompression_budget(packed, floor=floor, ratio=ratio)
    if unpacked <= limit:
        return None
    return (
        f"row group {group} ({meta.num_rows} rows) would decompress to {unpacked:,} bytes from {packed:,} on disk, "
        f"over the limit of {limit:,} (the larger of {floor:,} and {ratio}x its size): not read"
    )


def decompression_budget(packed: int, *, floor: int = ROW_GROUP_FLOOR, ratio: int = MAX_RATIO) -> int:
    """The most bytes a row group of `packed` bytes on disk may turn into."""
    return max(floor, ratio * packed)


def packed_size(metadata: pq.FileMetaData, group: int, columns: list[str]) -> int:
    """Bytes on disk of the column chunks of `columns` in one row group."""
    meta = metadata.row_group(group)
    chunks = (meta.column(i) for i in range(meta.num_columns))
    return sum(c.total_compressed_size for c in chunks if c.path_in_schema.split(".", 1)[0] in columns)


class ColumnValues:
    """One column of a record batch, read row by row without materialising repeats.

    A dictionary column (binary columns are read as dictionaries) keeps each distinct
    value once; `size(i)` says how many bytes row i holds before `get(i)` copies them.
    """

    def __init__(self, array: pa.Array) -> None:
        if pa.types.is_dictionary(array.type):
            self._values, self._index = array.dictionary, array.indices.to_pylist()
        else:
            self._values, self._index = array, None
        # Sizes stay a numpy array (-1: null): a dictionary read batch by batch grows towards the whole
        # row group, and turning it into Python objects for every 16-row batch made reading quadratic.
        self._sizes = (
            pc.binary_length(self._values).fill_null(-1).to_numpy(zero_copy_only=False)
            if _holds_bytes(self._values.type)
            else None
        )
        self._raw: pa.Array | None = None
        self._texts: dict[tuple[int, int], str] = {}

    def _at(self, row: int) -> int | None:
        return self._index[row] if self._index is not None else row

    def size(self, row: int) -> int | None:
        """Bytes of row `row` (None where it is null; 0 for a column that is not binary or text)."""
        at = self._at(row)
        if at is None:
            return None
        if self._sizes is None:
            return 0
        size = int(self._sizes[at])
        return None if size < 0 else size

    def get(self, row: int):
        """The Python value of row `row`."""
        at = self._at(row)
        return None if at is None else self._values[at].as_py()

    def text(self, row: int, limit: int) -> str | None:
        """Row `row` of a text or binary column as one line of at most `limit` bytes (None where null).

        A longer value is cut before it is copied, so a hostile 60 MB message costs `limit` bytes.
        Each distinct value is decoded once: a status column holds a handful of them.
        """
        at = self._at(row)
        if at is None or self._sizes is None or self._sizes[at] < 0:
            return None
        if (at, limit) not in self._texts:
            if self._raw is None:  # the same buffers seen as bytes: no copy, and no UTF-8 check to fail
                large = pa.types.is_large_string(self._values.type) or pa.types.is_large_binary(self._values.type)
                self._raw = self._values.view(pa.large_binary() if large else pa.binary())
            whole = self._sizes[at] <= limit
            raw = self._raw[at].as_py() if whole else pc.binary_slice(self._raw.slice(at, 1), 0, limit)[0].as_py()
            text = " ".join(raw.decode("utf-8", errors="replace").split())  # one line
            self._texts[at, limit] = text if whole else text + "..."
        return self._texts[at, limit]


def binary_columns(schema: pa.Schema, names: list[str]) -> list[str]:
    """The columns among `names` that hold bytes or text: the ones to read as dictionaries."""
    return [name for name in names if _holds_bytes(schema.field(name).type)]


def status_columns(schema: pa.Schema) -> list[str]:
    """img2dataset's `status` and `error_message` columns when the shard has both as text, else [].

    Both are needed: a `status` column alone may mean anything in someone else's data, and
    reading it as a failure there would turn good images into errors.
    """
    if STATUS_COLUMN not in schema.names or MESSAGE_COLUMN not in schema.names:
        return []
    text = (pa.types.is_string, pa.types.is_large_string)
    status, message = (_value_type(schema.field(name).type) for name in (STATUS_COLUMN, MESSAGE_COLUMN))
    # A writer without a schema (pandas, from_pylist) types a column that is null in every row as null.
    if any(t(status) for t in text) and (pa.types.is_null(message) or any(t(message) for t in text)):
        return [STATUS_COLUMN, MESSAGE_COLUMN]
    return []


def _value_type(kind: pa.DataType) -> pa.DataType:
    """The type of the values of a column, through dictionary encoding (pandas categoricals, ...)."""
    return kind.value_type if pa.types.is_dictionary(kind) else kind


_BYTES_TYPES = (
    pa.types.is_binary,
    pa.types.is_large_binary,
    pa.types.is_binary_view,
    pa.types.is_string,
    pa.types.is_large_string,
    pa.types.is_string_view,
)


def _is_binary(kind: pa.DataType) -> bool:
    return pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_binary_view(kind)


def _holds_bytes(kind: pa.DataType) -> bool:
    return any(test(kind) for test in _BYTES_TYPES)


class _Layout(NamedTuple):
    """The columns one shard is read with."""

    image: str
    id: str | None  # None: the shard has no id column
    outcome: list[str]  # [status, error_message] (status_columns), or [] where the shard has none

    @property
    def columns(self) -> list[str]:
        return list(dict.fromkeys([self.image] + ([self.id] if self.id else []) + self.outcome))


def read_parquet(
    path: str,
    rel: str,
    *,
    image_column: str = "jpg",
    id_column: str = "key",
    max_bytes: int,
    batch_rows: int = BATCH_ROWS,
) -> Iterator[SourceImage | dict]:
    """Every row of one Parquet shard -> SourceImage (uri `path#row=N`) or an error row.

    The id is `id_column` (as text); a shard without that column, or a row where
    it is null or empty, gets `rel#row=N` (N counts from 0 over the whole file).
    In a shard with img2dataset's `status` and `error_message` columns, a row whose
    status is set and is not "success" is a `source_failed` row that carries both.
    """
    shown, rel, handle, failed = common.open_shard(path, rel)
    if failed:
        yield failed
        return
    path = shown  # from here on the path is only written into uris
    with handle:
        try:
            footer = pq.ParquetFile(handle)
            schema = footer.schema_arrow
            layout = _Layout(image_column, id_column if id_column in schema.names else None, status_columns(schema))
            wanted = binary_columns(schema, [c for c in layout.columns if c in schema.names])
            shard = pq.ParquetFile(handle, metadata=footer.metadata, read_dictionary=wanted)
        except Exception as exc:  # no footer: truncated, or not Parquet at all
            yield common.shard_error(
                rel, path, "row=0", common.TRUNCATED_SHARD, f"not a readable Parquet file: {common.describe(exc)}"
            )
            return
        if image_column not in schema.names:
            yield common.record_error(rel, path, reasons.UNREADABLE, no_image_column(schema, image_column))
            return
        kind = schema.field(image_column).type
        if not _is_binary(kind):
            yield common.record_error(
                rel, path, reasons.UNREADABLE, f"image column {image_column!r} holds {kind}, not binary image bytes"
            )
            return
        first = 0
        for group in range(shard.metadata.num_row_groups):
            rows = shard.metadata.row_group(group).num_rows
            yield from _read_group(shard, group, first, rows, path, rel, layout, max_bytes, batch_rows)
            first += rows


def no_image_column(schema: pa.Schema, image_column: str) -> str:
    """The message of a shard without its image column: what it holds instead, and what to do."""
    names = schema.names
    found = f"no image column {image_column!r} in shard (columns: {', '.join(names)})"
    binary = [n for n in names if _is_binary(schema.field(n).type)]
    if binary:
        return f"{found}; binary columns here: {', '.join(map(repr, binary))}: name one with --parquet-image-column"
    if status_columns(schema) and "key" in names:
        # img2dataset writes this metadata file beside each .tar / .tfrecord shard of the same name.
        return (
            f"{found}: this is img2dataset's metadata file, without images; "
            "read the .tar or .tfrecord shards beside it instead (docs/INPUT_FORMATS.md)"
        )
    return f"{found}; name it with --parquet-image-column"


def _read_group(shard, group, first, rows, path, rel, layout: _Layout, max_bytes, batch_rows):
    """The rows of one row group, or the rows it could hand out and one row for the rest."""
    problem = row_group_problem(shard.metadata, group, layout.columns)
    if problem:
        yield _lost(path, rel, first, rows, reasons.TOO_LARGE, problem)
        return
    budget = decompression_budget(packed_size(shard.metadata, group, layout.columns))
    done = handed = 0
    try:
        for batch in shard.iter_batches(batch_size=batch_rows, row_groups=[group], columns=layout.columns):
            images = ColumnValues(batch.column(layout.image))
            ids = ColumnValues(batch.column(layout.id)) if layout.id else None
            outcome = [ColumnValues(batch.column(name)) for name in layout.outcome]
            for i in range(batch.num_rows):
                failure = _source_failure(outcome, i, images.size(i))
                size = 0 if failure else images.size(i) or 0
                if size <= max_bytes:
                    handed += size
                handed += len(failure or "")  # a message repeated row after row counts too
                if handed > budget:  # one stored value repeated row after row
                    yield _lost(
                        path,
                        rel,
                        first + done,
                        rows - done,
                        reasons.TOO_LARGE,
                        f"row group {group} repeats its values: its rows would hand out over {budget:,} bytes "
                        f"of images (the larger of {ROW_GROUP_FLOOR:,} and {MAX_RATIO}x its size on disk)",
                    )
                    return
                yield _row(path, rel, first + done, ids, images, i, max_bytes, failure)
                done += 1
    except Exception as exc:
        yield _lost(
            path,
            rel,
            first + done,
            rows - done,
            common.TRUNCATED_SHARD,
            f"row group {group} unreadable after {done} of its {rows} rows: {common.describe(exc)}",
        )


def _source_failure(outcome: list[ColumnValues], i: int, size: int | None) -> str | None:
    """The message of a row the shard itself marks as failed (status set, not "success"), else None."""
    if not outcome:
        return None
    status = outcome[0].text(i, MAX_SOURCE_TEXT)
    if not status or status == SUCCESS:
        return None
    error = outcome[1].text(i, MAX_SOURCE_TEXT) if len(outcome) > 1 else None
    text = f"the shard's status column says {status!r}; error_message: {error or '(none)'}"
    return text + (f" ({size:,} bytes in the image column not read)" if size else "")


def _lost(path: str, rel: str, at: int, count: int, reason: str, why: str) -> dict:
    """One row for the `count` rows of a row group from row `at` on, which are not read."""
    return common.shard_error(
        rel,
        path,
        f"row={at}",
        reason,
        f"{why}; rows {at}..{at + count - 1} ({count}) lost, the next row group is still read",
    )


def _row(
    path: str,
    rel: str,
    row: int,
    ids: ColumnValues | None,
    images: ColumnValues,
    i: int,
    max_bytes: int,
    failure: str | None = None,
) -> SourceImage | dict:
    uri = f"{path}#row={row}"
    fallback = f"{rel}#row={row}"
    key = None
    if ids is not None:
        if (ids.size(i) or 0) > MAX_ID_BYTES:
            return common.record_error(
                fallback, uri, reasons.UNREADABLE, f"the id column holds {ids.size(i):,} bytes (over {MAX_ID_BYTES:,})"
            )
        key = ids.get(i)
    if isinstance(key, bytes):
        key = key.decode("utf-8", errors="replace")
    rid = storage.safe_text(str(key)) if key is not None and str(key) != "" else fallback
    if failure is not None:
        return common.record_error(rid, uri, reasons.SOURCE_FAILED, failure)
    size = images.size(i)
    if not size:
        return common.record_error(rid, uri, reasons.EMPTY_FILE, "the image column is null or empty in this row")
    if size > max_bytes:
        return common.record_error(rid, uri, reasons.TOO_LARGE, common.too_large_message(size, max_bytes))
    return SourceImage(rid, uri, images.get(i))
