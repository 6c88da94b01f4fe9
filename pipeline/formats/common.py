"""What every shard reader shares: its extra reason codes, shard-level error rows and exact reads.

A shard reader is a generator `read_xxx(path, rel, ..., max_bytes) -> Iterator[SourceImage | dict]`:
it yields one SourceImage per good record and one error row (a dict from
`records.error_row`) per record it could not deliver, including one row for the
part of a damaged shard it could not read at all. It never raises for bad data,
so that one bad shard never stops the rest of the corpus.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pipeline import reasons, records, storage

# Reason codes that only shard readers produce (the `error` column of errors/*.parquet).
# They belong beside the others in pipeline/reasons.py; until they move there they live here.
from pipeline.reasons import CORRUPT_RECORD, TRUNCATED_SHARD  # noqa: F401 - re-exported for the readers

STAGE = "read"
MAX_ID_BYTES = 4096  # an id longer than this is not an id (every format refuses it the same way)


def shard_error(rel: str, path: str, position: str, reason: str, message: str) -> dict:
    """An error row for a stretch of a shard rather than one record.

    `position` says where in the shard ("offset=1234", "17", "row=42"); it goes into
    both the id (`rel#position`, which no record id of the same shard can take: see
    docs/INPUT_FORMATS.md) and the uri (`path#position`).
    """
    return records.error_row(f"{rel}#{position}", f"{path}#{position}", STAGE, reason, message)


def record_error(rid: str, uri: str, reason: str, message: str) -> dict:
    """An error row for one record of a shard."""
    return records.error_row(rid, uri, STAGE, reason, message)


def open_shard(
    path: str, rel: str, *, what: str = "shard", opener: Callable[[str], Any] = storage.open_regular
) -> tuple[str, str, Any, dict | None]:
    """(path as text, rel as text, what `opener(path)` returned, None), or the same with the `unreadable` row
    and no handle when the shard cannot be opened (`what` names it in the message).

    The shard is opened by its path as given; ids and uris carry it as valid UTF-8 text (storage.safe_text).
    """
    shown, rel = storage.safe_text(path), storage.safe_text(rel)
    try:
        return shown, rel, opener(path), None
    except Exception as exc:
        return shown, rel, None, record_error(rel, shown, reasons.UNREADABLE, f"cannot open {what}: {describe(exc)}")


def too_large_message(size: int, max_bytes: int) -> str:
    """The message of a too_large row, the same wording for every format."""
    return f"{size:,} bytes exceeds the limit of {max_bytes:,} (--max-bytes)"


def read_exact(handle, size: int) -> bytes:
    """Up to `size` bytes; fewer only at the end of the stream (some streams return short reads)."""
    chunks = []
    left = size
    while left > 0:
        chunk = handle.read(left)
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def skip_exact(handle, size: int, chunk: int = 1 << 20) -> int:
    """Read and drop `size` bytes in bounded chunks; returns how many there were."""
    done = 0
    while done < size:
        got = handle.read(min(chunk, size - done))
        if not got:
            break
        done += len(got)
    return done


def describe(exc: BaseException) -> str:
    """`Type: text` of an exception, the form of the `message` column."""
    return f"{type(exc).__name__}: {exc}"
