"""Reading an embeddings dataset and writing an index directory, on any Beam filesystem.

Everything goes through `FileSystems` (local, gs://, s3:// by the same code)
and pyarrow, one record batch at a time. FAISS itself only reads and writes
local files, so remote index files pass through a local temporary file.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import uuid
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from pipeline.storage import is_local, mkdirs, parquet_files, remove_tree

log = logging.getLogger(__name__)

IDS_ROW_GROUP = 4096
INDEX_FILES = ("index.faiss", "ids.parquet", "index.json")  # publish order: index.json last


@dataclasses.dataclass(frozen=True)
class Shard:
    """One Parquet file of the dataset; its rows get labels offset .. offset+rows-1."""

    path: str
    rows: int
    offset: int


@dataclasses.dataclass(frozen=True)
class Dataset:
    """What the footers and the small columns say about an embeddings dataset."""

    source: str  # the embeddings/ directory
    shards: tuple[Shard, ...]
    dim: int
    model: str
    model_config: dict | None
    has_thumbnails: bool

    @property
    def ntotal(self) -> int:
        return sum(s.rows for s in self.shards)


def _open(path: str):
    return FileSystems.open(path, compression_type="uncompressed")


def _read_manifest(path: str) -> dict | None:
    if not FileSystems.exists(path):
        return None
    with _open(path) as handle:
        return json.loads(handle.read().decode())


def resolve_embeddings(embeddings: str, *, require_manifest: bool = False) -> tuple[str, dict | None]:
    """(embeddings dir, manifest or None) for OUTPUT or OUTPUT/embeddings; `require_manifest` refuses none."""
    root = embeddings.rstrip("/")
    parent = root.rsplit("/", 1)[0] if "/" in root else "."
    for source, manifest_path in ((f"{root}/embeddings", f"{root}/manifest.json"), (root, f"{parent}/manifest.json")):
        if parquet_files(source):
            manifest = _read_manifest(manifest_path)
            if manifest is None and require_manifest:  # embed writes it last: without it the run is unfinished
                raise ValueError(
                    f"{manifest_path} is missing, so {source} is an unfinished embed run (failed, killed or still "
                    "going) or was not written by embedpipe; run the embed again, or pass --allow-no-manifest to "
                    "index these files as they are"
                )
            return source, manifest
    raise ValueError(
        f"empty dataset: no Parquet files under {root}/embeddings/ or {root}/; "
        "point --embeddings at the output of `embedpipe embed` (or its embeddings/ folder)"
    )


def _embedding_dim(path: str, schema: pa.Schema) -> int:
    missing = [c for c in ("id", "uri", "embedding", "model") if c not in schema.names]
    if missing:
        raise ValueError(f"{path} is not an embeddings file: missing column(s) {missing}")
    kind = schema.field("embedding").type
    if not (pa.types.is_fixed_size_list(kind) and pa.types.is_floating(kind.value_type)):
        raise ValueError(
            f"{path}: column 'embedding' must be fixed_size_list<float32, D> (as `embedpipe embed` writes); got {kind}"
        )
    return kind.list_size


def scan_dataset(embeddings: str) -> Dataset:
    """Validate a dataset from its footers and its id/model columns, before any vector is read.

    Raises:
        ValueError: no rows; files of different dimensions or model fingerprints (or not
            those of manifest.json); duplicate ids; a file that is not an embeddings file.
    """
    source, manifest = resolve_embeddings(embeddings)
    shards, by_dim, by_model, thumbs = [], collections.defaultdict(list), collections.defaultdict(list), []
    hashes, offset = [], 0
    for path in parquet_files(source):
        with _open(path) as handle:
            pf = pq.ParquetFile(handle, read_dictionary=["model"])
            schema = pf.schema_arrow
            by_dim[_embedding_dim(path, schema)].append(path)
            thumbs.append("thumbnail" in schema.names)
            rows = pf.metadata.num_rows
            for batch in pf.iter_batches(batch_size=65536, columns=["id", "model"]):
                for fp in _distinct(batch.column("model")):
                    if path not in by_model[fp]:
                        by_model[fp].append(path)
                hashes.append(np.fromiter(map(hash, batch.column("id").to_pylist()), np.int64, len(batch)))
        shards.append(Shard(path, rows, offset))
        offset += rows
    if offset == 0:
        raise ValueError(f"empty dataset: the Parquet files under {source} hold no rows")
    if len(by_dim) > 1:
        detail = "; ".join(f"dim {d}: {_few(files)}" for d, files in sorted(by_dim.items()))
        raise ValueError(f"embeddings of different dimensions cannot share an index: {detail}")
    dim = next(iter(by_dim))
    if manifest and manifest.get("embedding_dim") not in (None, dim):
        raise ValueError(
            f"wrong dimension: {source} holds {dim}-d vectors but its manifest.json says embedding_dim="
            f"{manifest['embedding_dim']}"
        )
    if len(by_model) > 1:
        detail = "; ".join(f"{fp!r} in {_few(files)}" for fp, files in sorted(by_model.items()))
        raise ValueError(
            f"vectors from different models (fingerprints) cannot share an index: {detail}. "
            "Re-embed everything with one model, or index each model's output separately."
        )
    model = next(iter(by_model))
    if manifest and manifest.get("model") not in (None, model):
        raise ValueError(
            f"the vectors under {source} carry fingerprint {model!r} but manifest.json names "
            f"{manifest['model']!r}: the dataset was mixed after the run; re-embed it"
        )
    _check_unique_ids(np.concatenate(hashes), shards)
    return Dataset(
        source=source,
        shards=tuple(shards),
        dim=dim,
        model=model,
        model_config=(manifest or {}).get("model_config"),
        has_thumbnails=any(thumbs),
    )


def _distinct(column: pa.Array) -> list[str]:
    """Distinct non-null strings of a (possibly dictionary-encoded) column."""
    if pa.types.is_dictionary(column.type):
        column = column.dictionary.take(column.indices.unique().drop_null())
    return [v for v in column.unique().to_pylist() if v is not None]


def _few(files: list[str], limit: int = 3) -> str:
    shown = ", ".join(os.path.basename(f) for f in files[:limit])
    return shown + (f" and {len(files) - limit} more" if len(files) > limit else "")


def _check_unique_ids(hashes: np.ndarray, shards: list[Shard]) -> None:
    # Hashes first (8 bytes per row); strings are read again only for the few that collide.
    order = np.argsort(hashes, kind="stable")
    clash = np.flatnonzero(hashes[order][1:] == hashes[order][:-1])
    if clash.size == 0:
        return
    suspects = set(np.concatenate([order[clash], order[clash + 1]]).tolist())
    seen: dict[str, str] = {}
    for shard in shards:
        with _open(shard.path) as handle:
            ids = pq.read_table(handle, columns=["id"]).column("id").to_pylist()
        for row, value in enumerate(ids):
            if shard.offset + row in suspects:
                if value in seen:
                    raise ValueError(
                        f"duplicate id {value!r} in {os.path.basename(seen[value])} and "
                        f"{os.path.basename(shard.path)}: ids must be unique within a corpus"
                    )
                seen[value] = shard.path


def _to_matrix(column: pa.Array, dim: int, path: str) -> np.ndarray:
    if column.null_count:
        raise ValueError(f"{path}: {column.null_count} null embedding(s); the embed stage never writes these")
    flat = column.flatten().to_numpy(zero_copy_only=False)
    return np.array(flat, dtype=np.float32).reshape(-1, dim)  # a private, writable copy (normalised in place)


def iter_batches(
    shard: Shard, dim: int, batch_rows: int, columns: tuple[str, ...] = ()
) -> Iterator[tuple[int, np.ndarray, pa.RecordBatch]]:
    """(first row in the shard, float32 (b, dim) vectors, the batch's other `columns`) per record batch.

    Raises:
        ValueError: a non-finite or null vector (named by id and file).
    """
    with _open(shard.path) as handle:
        pf = pq.ParquetFile(handle)
        wanted = [c for c in ("id", *columns) if c in pf.schema_arrow.names and c != "embedding"]
        start = 0
        for batch in pf.iter_batches(batch_size=batch_rows, columns=["embedding", *dict.fromkeys(wanted)]):
            x = _to_matrix(batch.column("embedding"), dim, shard.path)
            finite = np.isfinite(x).all(axis=1)
            if not finite.all():
                bad = batch.column("id")[int(np.flatnonzero(~finite)[0])]
                raise ValueError(f"{shard.path}: the vector of id {bad} holds NaN or infinity; re-embed that image")
            yield start, x, batch
            start += len(batch)


def iter_columns(shard: Shard, columns: tuple[str, ...], batch_rows: int) -> Iterator[tuple[int, pa.RecordBatch]]:
    """(first row in the shard, batch) of the named columns that the file has; no vectors read."""
    with _open(shard.path) as handle:
        pf = pq.ParquetFile(handle)
        start = 0
        for batch in pf.iter_batches(batch_size=batch_rows, columns=[c for c in columns if c in pf.schema_arrow.names]):
            yield start, batch
            start += len(batch)


class IdsWriter:
    """Streams ids.parquet (label, id, uri[, thumbnail]) in row groups of exactly 4096 rows."""

    def __init__(self, path: str, *, thumbnails: bool) -> None:
        fields = [
            pa.field("label", pa.int64(), nullable=False),
            pa.field("id", pa.string(), nullable=False),
            pa.field("uri", pa.string(), nullable=False),
        ]
        if thumbnails:
            fields.append(pa.field("thumbnail", pa.binary()))
        self.schema = pa.schema(fields)
        self.rows = 0
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._handle = FileSystems.create(path)
        self._writer = pq.ParquetWriter(self._handle, self.schema, compression="snappy")

    def write(self, batch: pa.RecordBatch, first_label: int) -> None:
        """Append the rows of a batch (with columns id, uri and maybe thumbnail) labelled from first_label."""
        if first_label != self.rows:
            raise RuntimeError(f"ids out of order: label {first_label} after {self.rows} rows")
        n = len(batch)
        columns = [
            pa.array(np.arange(first_label, first_label + n, dtype=np.int64)),
            batch.column("id"),
            batch.column("uri"),
        ]
        if "thumbnail" in self.schema.names:
            names = batch.schema.names
            columns.append(batch.column("thumbnail") if "thumbnail" in names else pa.nulls(n, pa.binary()))
        self._pending.append(pa.Table.from_arrays(columns, schema=self.schema))
        self._pending_rows += n
        self.rows += n
        self._flush(final=False)

    def _flush(self, *, final: bool) -> None:
        if not self._pending:
            return
        table = pa.concat_tables(self._pending)
        whole = (len(table) // IDS_ROW_GROUP) * IDS_ROW_GROUP
        cut = len(table) if final else whole
        if cut:
            self._writer.write_table(table.slice(0, cut), row_group_size=IDS_ROW_GROUP)
        rest = table.slice(cut)
        self._pending, self._pending_rows = ([rest] if len(rest) else []), len(rest)

    def close(self) -> None:
        self._flush(final=True)
        self._writer.close()
        self._handle.close()


def staging_dir(output: str) -> str:
    """A fresh directory beside `output`, on the same filesystem, so publishing is a rename."""
    out = output.rstrip("/")
    if is_local(out):
        out = os.path.abspath(out)
    parent, name = out.rsplit("/", 1)
    path = f"{parent}/.{name}.building-{uuid.uuid4().hex[:12]}"
    mkdirs(path)
    return path


def publish(staging: str, output: str) -> None:
    """Move index.faiss and ids.parquet into output, then index.json last.

    While this runs the output has no index.json, so readers see "no index", never a mix.
    """
    out = output.rstrip("/")
    mkdirs(out)
    for name in ("index.json", *INDEX_FILES[:2]):
        if FileSystems.exists(f"{out}/{name}"):
            FileSystems.delete([f"{out}/{name}"])
    for name in INDEX_FILES:
        FileSystems.rename([f"{staging}/{name}"], [f"{out}/{name}"])
    remove_tree(staging, best_effort=True)
