"""Small seeded shard sets for the reader tests: the same images in every input format.

TFRecords are written with TensorFlow's own `tf.train.Example` and
`tf.io.TFRecordWriter`, tars with `tarfile`, Parquet with pyarrow: the readers
are tested against what real tools write, not against our own encoders.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import pathlib
import tarfile
import threading
import time
from typing import ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.localfilesystem import LocalFileSystem

from pipeline.sample import jpeg_bytes, photos, variant


def make_images(count: int = 8, *, seed: int = 0, megapixels: float = 0.004) -> dict[str, bytes]:
    """name (`img00`, ...) -> JPEG bytes of a small real photo variant, all different, seeded."""
    rng = np.random.default_rng(seed)
    base = photos()
    names = sorted(base)
    return {
        f"img{i:02d}": jpeg_bytes(variant(base[names[i % len(names)]], rng, megapixels), quality=90)
        for i in range(count)
    }


def write_files(folder: pathlib.Path, images: dict[str, bytes]) -> list[pathlib.Path]:
    """One `<name>.jpg` per image under `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, data in images.items():
        path = folder / f"{name}.jpg"
        path.write_bytes(data)
        paths.append(path)
    return paths


def _add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 1_700_000_000  # fixed, so that shards are byte-identical run to run
    archive.addfile(info, io.BytesIO(data))


def write_tar(
    path: pathlib.Path,
    samples: list[tuple[str, bytes]],
    *,
    meta: dict[str, str] | None = None,
    mode: str = "w",
    extra: dict[str, bytes] | None = None,
) -> pathlib.Path:
    """A WebDataset tar: `<key>.jpg` (+ `<key>.json`/`<key>.txt` from `meta`, value `json:...`/`txt:...`).

    `extra` adds members by full name (e.g. a `.cls` field) right after the sample of the same key.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = meta or {}
    extra = extra or {}
    with tarfile.open(path, mode, format=tarfile.PAX_FORMAT) as archive:
        for key, data in samples:
            _add(archive, f"{key}.jpg", data)
            if key in meta:
                kind, _, text = meta[key].partition(":")
                _add(archive, f"{key}.{kind}", text.encode())
            for name, blob in extra.items():
                if name.split(".", 1)[0] == key:
                    _add(archive, name, blob)
    return path


def tf_example(features: dict[str, bytes | int | list]) -> bytes:
    """A serialized tf.train.Example made by TensorFlow itself."""
    import tensorflow as tf

    feature = {}
    for name, value in features.items():
        values = value if isinstance(value, list) else [value]
        if all(isinstance(v, bytes) for v in values):
            feature[name] = tf.train.Feature(bytes_list=tf.train.BytesList(value=values))
        elif all(isinstance(v, int) for v in values):
            feature[name] = tf.train.Feature(int64_list=tf.train.Int64List(value=values))
        else:
            feature[name] = tf.train.Feature(float_list=tf.train.FloatList(value=values))
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def write_tfrecord(path: pathlib.Path, examples: list[bytes], *, gzip: bool = False) -> pathlib.Path:
    """Serialized examples -> a TFRecord file written by tf.io.TFRecordWriter."""
    import tensorflow as tf

    path.parent.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(path), options="GZIP" if gzip else None) as writer:
        for example in examples:
            writer.write(example)
    return path


def image_examples(samples: list[tuple[str, bytes]], *, key_feature: str = "image/id") -> list[bytes]:
    """One Example per (key, image) with the usual extra features (height, a float) around it."""
    return [
        tf_example({key_feature: key.encode(), "image/encoded": data, "image/height": 7, "image/score": 0.5})
        for key, data in samples
    ]


def write_parquet(
    path: pathlib.Path,
    samples: list[tuple[str | None, bytes | None]],
    *,
    row_group_size: int = 3,
    id_column: str = "key",
    image_column: str = "jpg",
) -> pathlib.Path:
    """img2dataset-like Parquet: `key` (string), `jpg` (binary), `width` (int), small row groups."""
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table(
        {
            id_column: pa.array([k for k, _ in samples], pa.string()),
            image_column: pa.array([d for _, d in samples], pa.binary()),
            "width": pa.array([7] * len(samples), pa.int32()),
        }
    )
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def write_csv_list(path: pathlib.Path, entries: list[tuple[str, str | None]], *, header: bool = True) -> pathlib.Path:
    """A CSV URI list `uri,id` (an empty id cell when the id is None)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as out:
        writer = csv.writer(out)
        if header:
            writer.writerow(["uri", "id"])
        for uri, rid in entries:
            writer.writerow([uri, rid or ""])
    return path


def write_text_list(path: pathlib.Path, uris: list[str]) -> pathlib.Path:
    """A text URI list, with a comment and a blank line that the reader must skip."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# images\n" + "\n".join(uris[:1]) + "\n\n" + "\n".join(uris[1:]) + "\n")
    return path


def meta_json(**fields) -> str:
    """`json:{...}` meta value for write_tar."""
    return "json:" + json.dumps(fields, sort_keys=True)


def build_cross_format_corpus(root: pathlib.Path, images: dict[str, bytes]) -> dict[str, list[str]]:
    """The same images in every format under `root`; format -> input paths. Ids differ per format.

    files/ (ids img00.jpg...), tar/ (two shards, one gzip'd), tfrecord/ (plain + gzip),
    parquet/ (two shards), urilist/ (a CSV naming files/ with ids `csv-...`).
    """
    items = list(images.items())
    half = len(items) // 2
    write_files(root / "files", images)
    write_tar(
        root / "tar" / "shard-0.tar",
        items[:half],
        meta={items[0][0]: meta_json(caption="first"), items[1][0]: "txt:a caption"},
    )
    write_tar(root / "tar" / "shard-1.tar.gz", items[half:], mode="w:gz")
    tf_items = [(f"tfr-{k}", d) for k, d in items]
    write_tfrecord(root / "tfrecord" / "part-0.tfrecord", image_examples(tf_items[:half]))
    write_tfrecord(root / "tfrecord" / "part-1.tfrecord.gz", image_examples(tf_items[half:]), gzip=True)
    pq_items = [(f"pq-{k}", d) for k, d in items]
    write_parquet(root / "parquet" / "part-0.parquet", pq_items[:half])
    write_parquet(root / "parquet" / "part-1.parquet", pq_items[half:])
    write_csv_list(root / "urilist" / "list.csv", [(f"../files/{k}.jpg", f"csv-{k}") for k, _ in items])
    return {
        "files": [str(root / "files")],
        "tar": [str(root / "tar" / "*.tar"), str(root / "tar" / "*.tar.gz")],
        "tfrecord": [str(root / "tfrecord" / "*.tfrecord"), str(root / "tfrecord" / "*.tfrecord.gz")],
        "parquet": [str(root / "parquet" / "*.parquet")],
        "urilist": [str(root / "urilist" / "list.csv")],
    }


# ---------------------------------------------------------------- decompression bombs
# Streamed to disk 1 MiB at a time: a bomb of any decompressed size costs no memory to build.
# `level` 1 compresses zeros ~230x in a second per 256 MiB; 9 gives ~1000x at 4x the time.

_ZEROS = b"\0" * (1 << 20)


def _write_zeros(out, size: int, fill: bytes = _ZEROS) -> None:
    left = size
    while left:
        n = min(left, len(fill))
        out.write(fill[:n] if n < len(fill) else fill)
        left -= n


def _write_jpeg_members(out, members) -> None:
    """Write (key, bytes) pairs as KEY.jpg tar members, then the end-of-archive blocks."""
    for key, data in members:
        info = tarfile.TarInfo(f"{key}.jpg")
        info.size = len(data)
        out.write(info.tobuf(tarfile.GNU_FORMAT) + data + b"\0" * (-len(data) % tarfile.BLOCKSIZE))
    out.write(b"\0" * 2 * tarfile.BLOCKSIZE)


def proto_varint(n: int) -> bytes:
    """A protobuf varint."""
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def proto_field(number: int, wire: int, payload: bytes) -> bytes:
    """One protobuf field; a length-delimited one (wire type 2) gets its length prefix."""
    if wire == 2:
        return proto_varint(number << 3 | 2) + proto_varint(len(payload)) + payload
    return proto_varint(number << 3 | wire) + payload


def write_tar_bomb(
    path: pathlib.Path, size: int, *, name: str = "0000.jpg", after: list[tuple[str, bytes]] = (), level: int = 1
):
    """A gzip'd tar: one member `name` of `size` zero bytes, then `<key>.jpg` members for `after`."""
    import gzip

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=level, mtime=0) as out:
        info = tarfile.TarInfo(name)
        info.size = size
        out.write(info.tobuf(tarfile.GNU_FORMAT))
        _write_zeros(out, size + (-size % tarfile.BLOCKSIZE))
        _write_jpeg_members(out, after)
    return path


def write_pax_bomb(path: pathlib.Path, size: int, *, after: list[tuple[str, bytes]] = (), level: int = 1):
    """A gzip'd tar whose first header is a pax extended header claiming `size` bytes (zeros)."""
    import gzip

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=level, mtime=0) as out:
        info = tarfile.TarInfo("././@PaxHeader")
        info.type = tarfile.XHDTYPE
        info.size = size
        out.write(info.tobuf(tarfile.USTAR_FORMAT))
        _write_zeros(out, size + (-size % tarfile.BLOCKSIZE))
        _write_jpeg_members(out, after)
    return path


def write_tfrecord_bomb(path: pathlib.Path, size: int, *, after: list[bytes] = (), level: int = 1):
    """A gzip'd TFRecord: one well-formed record of `size` zero bytes, then the serialized examples `after`."""
    import gzip
    import struct

    from google_crc32c import extend

    from pipeline.formats.tfrecord import encode_frame, masked_crc32c

    path.parent.mkdir(parents=True, exist_ok=True)
    crc, left = 0, size
    while left:  # crc32c of the zeros, without holding them
        n = min(left, len(_ZEROS))
        crc = extend(crc, _ZEROS[:n])
        left -= n
    masked = (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=level, mtime=0) as out:
        length = struct.pack("<Q", size)
        out.write(length + struct.pack("<I", masked_crc32c(length)))
        _write_zeros(out, size)
        out.write(struct.pack("<I", masked))
        for example in after:
            out.write(encode_frame(example))
    return path


def write_list_bomb(path: pathlib.Path, size: int, *, before: list[str] = (), after: list[str] = (), level: int = 1):
    """A gzip'd text URI list: the lines `before`, one line of `size` bytes ('a'), the lines `after`."""
    import gzip

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=level, mtime=0) as out:
        out.write("".join(f"{line}\n" for line in before).encode())
        _write_zeros(out, size, b"a" * (1 << 20))
        out.write(b"\n" + "".join(f"{line}\n" for line in after).encode())
    return path


def write_parquet_bomb(path: pathlib.Path, case: str) -> pathlib.Path:
    """A few-KB Parquet file (zstd) that describes far more than it holds.

    `one-value`: one 64 MiB value of zeros; `repeated-value`: one 8 MiB dictionary value
    used by 512 rows; `repeated-uri`: a URI list whose 20,000 rows share one 66,000-byte "URI".
    """
    if case == "one-value":
        table = pa.table({"key": ["0"], "jpg": pa.array([bytes(64 << 20)], pa.binary())})
    elif case == "repeated-value":
        jpg = pa.DictionaryArray.from_arrays(pa.array([0] * 512, pa.int32()), pa.array([bytes(8 << 20)]))
        table = pa.table({"key": [str(i) for i in range(512)], "jpg": jpg})
    elif case == "repeated-uri":
        uri = pa.DictionaryArray.from_arrays(pa.array([0] * 20_000, pa.int32()), pa.array(["a" * 66_000]))
        table = pa.table({"uri": uri})
    else:
        raise ValueError(f"no such Parquet bomb: {case!r}")
    # store_schema=False: the Arrow schema would say "dictionary", the file's own says binary/string
    pq.write_table(table, path, compression="zstd", dictionary_pagesize_limit=1 << 30, store_schema=False)
    return path


# ---------------------------------------------------------------- special files and slow sources


class Unblock:
    """After `after` s, keeps opening a FIFO's write end so that a reader stuck on it returns; says if it had to.

    A reader that opens the FIFO again after the first release is released again (every second).
    """

    def __init__(self, fifo, after: float = 10.0) -> None:
        self.fired = False
        self._fifo = str(fifo)
        self._after = after
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        if self._done.wait(self._after):
            return
        self.fired = True
        while not self._done.is_set():
            with contextlib.suppress(OSError):  # ENXIO: no reader waits right now
                os.close(os.open(self._fifo, os.O_WRONLY | os.O_NONBLOCK))
            self._done.wait(1.0)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()


class SlowFs(LocalFileSystem):
    """`slowfs://BUCKET/...`: a bucket named `down-*` answers every open after DELAY s with an error.

    Stands in for an unreachable gs:// bucket (the client retries for ~110 s); other buckets serve bytes.
    """

    DELAY = 1.0
    opened: ClassVar[list[str]] = []

    @classmethod
    def scheme(cls) -> str:
        return "slowfs"

    def open(self, path, mime_type="application/octet-stream", compression_type="auto"):
        SlowFs.opened.append(path)
        if path.split("://", 1)[1].startswith("down-"):
            time.sleep(self.DELAY)
            raise OSError(f"{path}: connection timed out")
        return io.BytesIO(b"bytes of " + path.encode())


# ---------------------------------------------------------------- img2dataset's output
# Laid out as img2dataset (1.47, rom1504/img2dataset) writes it, per its downloader.py and writer.py,
# and checked against its real output: every row's metadata is the input columns (`caption`, `url`)
# then `key` (9 digits: shard and index), `status` ("success", "failed_to_download",
# "failed_to_resize"), `error_message`, `width`, `height`, `original_width`, `original_height`
# (int32), `exif` and `sha256`. Its Parquet output adds the image column (`jpg`, named by
# --encode_format) and keeps failed rows with a null image; its TFRecord and WebDataset outputs hold
# the successes only, each beside a `.parquet` of every row's metadata without images.

I2D_SCHEMA = pa.schema(
    [("caption", pa.string()), ("url", pa.string()), ("key", pa.string()), ("status", pa.string())]
    + [("error_message", pa.string())]
    + [(name, pa.int32()) for name in ("width", "height", "original_width", "original_height")]
    + [("exif", pa.string()), ("sha256", pa.string())]
)


def img2dataset_meta(rows: list[tuple[str, bytes | None, str, str | None]]) -> list[dict]:
    """(key, image or None, status, error_message) -> img2dataset's metadata dict of each row."""
    import hashlib

    metas = []
    for key, data, status, error in rows:
        ok = status == "success"
        size = 32 if ok else None
        metas.append(
            {
                "caption": f"caption of {key}",
                "url": f"http://images.example/{key}.jpg",
                "key": key,
                "status": status,
                "error_message": error,
                "width": size,
                "height": size,
                "original_width": 57 if ok else None,
                "original_height": 70 if ok else None,
                "exif": "{}" if ok else None,
                "sha256": hashlib.sha256(data).hexdigest() if ok and data else None,
            }
        )
    return metas


def write_img2dataset_parquet(
    path: pathlib.Path,
    rows: list[tuple[str, bytes | None, str, str | None]],
    *,
    encode_format: str | None = "jpg",
    buffer_rows: int = 100,
) -> pathlib.Path:
    """img2dataset's Parquet output (`encode_format=None`: the metadata-only file beside a tar/TFRecord).

    Written as its BufferedParquetWriter does: one pq.ParquetWriter, a table every `buffer_rows` rows.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    schema = I2D_SCHEMA.append(pa.field(encode_format, pa.binary())) if encode_format else I2D_SCHEMA
    metas = img2dataset_meta(rows)
    if encode_format:
        for meta, (_, data, status, _) in zip(metas, rows, strict=True):
            meta[encode_format] = data if status == "success" else None
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, len(metas), buffer_rows):
            chunk = metas[start : start + buffer_rows]
            writer.write_table(pa.Table.from_pylist(chunk, schema))
    return path


def img2dataset_examples(rows: list[tuple[str, bytes | None, str, str | None]], *, encode_format: str = "jpg"):
    """img2dataset's tf.train.Examples of the successful rows, made by TensorFlow.

    As its TFRecordSampleWriter: `key` and the image as bytes, `txt` (the caption), then every
    metadata field (text and None as bytes, ints as int64).
    """
    examples = []
    for meta, (key, data, status, _) in zip(img2dataset_meta(rows), rows, strict=True):
        if status != "success":
            continue
        features: dict = {"key": key.encode(), encode_format: data, "txt": meta["caption"].encode()}
        for name, value in meta.items():
            features[name] = value if isinstance(value, int) else (value or "").encode()
        examples.append(tf_example(features))
    return examples


def write_img2dataset_tar(path: pathlib.Path, rows: list[tuple[str, bytes | None, str, str | None]]) -> pathlib.Path:
    """img2dataset's WebDataset tar (`<key>.jpg`, `<key>.json`, `<key>.txt` of each success) and its `.parquet`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as archive:
        for meta, (key, data, status, _) in zip(img2dataset_meta(rows), rows, strict=True):
            if status == "success":
                _add(archive, f"{key}.jpg", data)
                _add(archive, f"{key}.json", json.dumps(meta, indent=4).encode())
                _add(archive, f"{key}.txt", meta["caption"].encode())
    write_img2dataset_parquet(path.with_suffix(".parquet"), rows, encode_format=None)
    return path
