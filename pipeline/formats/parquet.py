"""Parquet shards with the image bytes in a column (img2dataset's layout: `key`, `jpg`).

Read one row group at a time in small record batches, through a buffered
stream, so memory holds a batch of images and a read buffer, never the shard or
a whole column chunk. A row group that fails to read becomes one error row for
its rows and the next row group is still read.
"""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from pipeline import reasons
from pipeline.formats import common
from pipeline.records import SourceImage

BATCH_ROWS = 16  # images per record batch: a few MB for typical photos


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
    """
    try:
        handle = FileSystems.open(path, compression_type="uncompressed")
    except Exception as exc:
        yield common.record_error(rel, path, reasons.UNREADABLE, f"cannot open shard: {common.describe(exc)}")
        return
    with handle:
        try:
            shard = pq.ParquetFile(handle)
        except Exception as exc:  # no footer: truncated, or not Parquet at all
            yield common.shard_error(
                rel, path, "row=0", common.TRUNCATED_SHARD, f"not a readable Parquet file: {common.describe(exc)}"
            )
            return
        names = shard.schema_arrow.names
        if image_column not in names:
            yield common.record_error(
                rel,
                path,
                reasons.UNREADABLE,
                f"no image column {image_column!r} in shard (columns: {', '.join(names)}); "
                "name it with --parquet-image-column",
            )
            return
        kind = shard.schema_arrow.field(image_column).type
        if not (pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_binary_view(kind)):
            yield common.record_error(
                rel, path, reasons.UNREADABLE, f"image column {image_column!r} holds {kind}, not binary image bytes"
            )
            return
        columns = [image_column] + ([id_column] if id_column in names else [])
        first = 0
        for group in range(shard.metadata.num_row_groups):
            rows = shard.metadata.row_group(group).num_rows
            done = 0
            try:
                for batch in shard.iter_batches(batch_size=batch_rows, row_groups=[group], columns=columns):
                    images = batch.column(image_column).to_pylist()
                    ids = batch.column(id_column).to_pylist() if id_column in names else [None] * len(images)
                    for offset, (key, data) in enumerate(zip(ids, images)):
                        yield _row(path, rel, first + done + offset, key, data, max_bytes)
                    done += batch.num_rows
            except Exception as exc:
                lost = rows - done
                yield common.shard_error(
                    rel,
                    path,
                    f"row={first + done}",
                    common.TRUNCATED_SHARD,
                    f"row group {group} unreadable after {done} of its {rows} rows: {common.describe(exc)}; "
                    f"rows {first + done}..{first + rows - 1} ({lost}) lost, the next row group is still read",
                )
            first += rows


def _row(path: str, rel: str, row: int, key, data: bytes | None, max_bytes: int) -> SourceImage | dict:
    uri = f"{path}#row={row}"
    if isinstance(key, bytes):
        key = key.decode("utf-8", errors="replace")
    rid = str(key) if key is not None and str(key) != "" else f"{rel}#row={row}"
    if not data:
        return common.record_error(rid, uri, reasons.EMPTY_FILE, "the image column is null or empty in this row")
    if len(data) > max_bytes:
        return common.record_error(rid, uri, reasons.TOO_LARGE, common.too_large_message(len(data), max_bytes))
    return SourceImage(rid, uri, data)
