"""The records that flow between stages, and the Parquet schemas they end up in."""

from __future__ import annotations

import dataclasses
import datetime

import numpy as np
import pyarrow as pa


@dataclasses.dataclass
class SourceImage:
    """Raw bytes of one image as read from the corpus."""

    id: str
    uri: str
    data: bytes
    meta: str | None = None
    # The source's change marker at listing time (formats.files.change_marker), None where the
    # source has none we trust; it is written with the row so that the next night can skip the file.
    marker: str | None = None


@dataclasses.dataclass
class DecodedImage:
    """One image decoded and resized to the model's input."""

    id: str
    uri: str
    pixels: np.ndarray  # uint8 (S, S, 3) RGB
    content_sha256: str
    width: int  # original pixels, after EXIF orientation
    height: int
    meta: str | None = None
    thumbnail: bytes | None = None
    marker: str | None = None  # SourceImage.marker, carried to the embedding row


def embeddings_schema(dim: int, *, thumbnails: bool = False, meta: bool = False) -> pa.Schema:
    """Schema of embeddings/*.parquet: vectors of `dim` (the model's width), optional columns only when asked for."""
    fields = [
        pa.field("id", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("embedding", pa.list_(pa.float32(), dim), nullable=False),
        pa.field("content_sha256", pa.string(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("model", pa.string(), nullable=False),
        pa.field("embedded_at", pa.timestamp("us", tz="UTC"), nullable=False),
        # Change marker of the source file when its bytes were read (null: none, read it next time).
        pa.field("source_marker", pa.string()),
    ]
    if meta:
        fields.append(pa.field("meta", pa.string()))
    if thumbnails:
        fields.append(pa.field("thumbnail", pa.binary()))
    return pa.schema(fields)


ERRORS_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("stage", pa.string(), nullable=False),  # read / decode / embed
        pa.field("error", pa.string(), nullable=False),  # one of the reason codes above
        pa.field("message", pa.string(), nullable=False),
        pa.field("content_sha256", pa.string()),
    ]
)


def error_row(id: str, uri: str, stage: str, error: str, message: str, content_sha256: str | None = None) -> dict:
    """One row of errors/*.parquet."""
    return {
        "id": id,
        "uri": uri,
        "stage": stage,
        "error": error,
        "message": message[:2000],
        "content_sha256": content_sha256,
    }


def embedding_row(image: DecodedImage, vector: np.ndarray, model: str, embedded_at: datetime.datetime) -> dict:
    """One row of embeddings/*.parquet."""
    row = {
        "id": image.id,
        "uri": image.uri,
        "embedding": vector,
        "content_sha256": image.content_sha256,
        "width": image.width,
        "height": image.height,
        "model": model,
        "embedded_at": embedded_at,
    }
    if image.meta is not None:
        row["meta"] = image.meta
    if image.marker is not None:
        row["source_marker"] = image.marker
    if image.thumbnail is not None:
        row["thumbnail"] = image.thumbnail
    return row
