"""img2dataset's output read as img2dataset means it: Parquet, TFRecord and WebDataset tar.

Shards are laid out as img2dataset writes them (tests/shard_fixtures.py: its schema, status
values and TFRecord features, TFRecords made by TensorFlow itself). Failed rows of its Parquet
output are `source_failed` rows that carry its status and error_message; its TFRecords are
read from `key`/`jpg` without options, and only where the default features find nothing.
"""

from __future__ import annotations

import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from shard_fixtures import (
    img2dataset_examples,
    make_images,
    tf_example,
    write_img2dataset_parquet,
    write_img2dataset_tar,
    write_tfrecord,
)

from pipeline import reasons
from pipeline.config import EmbedConfig, ModelConfig
from pipeline.formats.parquet import MAX_SOURCE_TEXT, read_parquet
from pipeline.formats.tar import read_tar
from pipeline.formats.tfrecord import read_tfrecord
from pipeline.job import run_embed
from pipeline.records import SourceImage

MAX_BYTES = 10_000_000
# img2dataset's own error messages (downloader.py, resizer.py)
NOT_FOUND = "HTTP Error 404: Not Found"
UNDECODABLE = "Image decoding error"


@pytest.fixture(scope="module")
def images() -> dict[str, bytes]:
    return make_images(4, seed=21)


def shard_rows(images: dict[str, bytes], shard: int) -> list[tuple]:
    """One img2dataset shard: three successes, a failed download, a failed resize (keys as it makes them)."""
    data = list(images.values())
    key = [f"{shard:05d}{i:04d}" for i in range(5)]
    return [
        (key[0], data[0], "success", None),
        (key[1], None, "failed_to_download", NOT_FOUND),
        (key[2], data[1], "success", None),
        (key[3], None, "failed_to_resize", UNDECODABLE),
        (key[4], data[2], "success", None),
    ]


def outcome(items) -> list[tuple]:
    """(id, what) per item: the image bytes' length, or the error row's reason and message."""
    return [(i.id, len(i.data)) if isinstance(i, SourceImage) else (i["id"], i["error"], i["message"]) for i in items]


# ---------------------------------------------------------------- Parquet


def test_failed_rows_of_img2dataset_parquet_are_source_failed_with_its_status_and_message(tmp_path, images):
    rows = shard_rows(images, 0)
    path = write_img2dataset_parquet(tmp_path / "00000.parquet", rows)

    got = outcome(read_parquet(str(path), "00000.parquet", max_bytes=MAX_BYTES))

    said = "the shard's status column says"
    assert got == [
        ("000000000", len(rows[0][1])),
        ("000000001", reasons.SOURCE_FAILED, f"{said} 'failed_to_download'; error_message: {NOT_FOUND}"),
        ("000000002", len(rows[2][1])),
        ("000000003", reasons.SOURCE_FAILED, f"{said} 'failed_to_resize'; error_message: {UNDECODABLE}"),
        ("000000004", len(rows[4][1])),
    ]


def test_a_status_column_is_only_read_beside_error_message_and_only_success_or_null_is_read_as_before(tmp_path):
    data = make_images(1, seed=4)["img00"]
    # someone else's table with a `status` column of its own: its rows are images, as before
    other = tmp_path / "other.parquet"
    table = {"key": ["a", "b"], "status": ["draft", "published"], "jpg": pa.array([data, data], pa.binary())}
    pq.write_table(pa.table(table), other)
    assert outcome(read_parquet(str(other), "other", max_bytes=MAX_BYTES)) == [("a", len(data)), ("b", len(data))]

    # img2dataset's columns (error_message null in every row: typed null without a schema): a null status
    # claims nothing; a failed row keeps the bytes it has out of the embedding and says so
    mixed = tmp_path / "mixed.parquet"
    table = {
        "key": ["ok", "unknown", "failed"],
        "status": ["success", None, "failed_to_download"],
        "error_message": [None, None, None],
        "jpg": pa.array([data, data, data], pa.binary()),
    }
    pq.write_table(pa.table(table), mixed)
    assert outcome(read_parquet(str(mixed), "mixed", max_bytes=MAX_BYTES)) == [
        ("ok", len(data)),
        ("unknown", len(data)),
        (
            "failed",
            reasons.SOURCE_FAILED,
            "the shard's status column says 'failed_to_download'; error_message: (none) "
            f"({len(data):,} bytes in the image column not read)",
        ),
    ]


def test_a_huge_or_multiline_error_message_becomes_one_short_line(tmp_path):
    path = tmp_path / "long.parquet"
    huge = "x" * 5_000_000
    table = {
        "key": ["huge", "lines"],
        "status": ["failed_to_download", "failed_to_resize"],
        "error_message": [huge, "Traceback:\n  line 1\r\n  boom"],
        "jpg": pa.array([None, None], pa.binary()),
    }
    pq.write_table(pa.table(table), path)

    huge_row, lines_row = read_parquet(str(path), "long", max_bytes=MAX_BYTES)

    assert huge_row["error"] == reasons.SOURCE_FAILED
    assert (
        huge_row["message"].endswith("x" * MAX_SOURCE_TEXT + "...") and len(huge_row["message"]) < 2 * MAX_SOURCE_TEXT
    )
    assert lines_row["message"].endswith("error_message: Traceback: line 1 boom")


def test_img2dataset_metadata_parquet_and_other_encode_formats_say_what_to_read(tmp_path, images):
    rows = shard_rows(images, 0)
    tar = write_img2dataset_tar(tmp_path / "00000.tar", rows)  # writes 00000.parquet beside it, without images
    (sidecar,) = read_parquet(str(tar.with_suffix(".parquet")), "00000.parquet", max_bytes=MAX_BYTES)
    assert sidecar["error"] == reasons.UNREADABLE
    assert "img2dataset's metadata file, without images; read the .tar or .tfrecord shards" in sidecar["message"]

    png = write_img2dataset_parquet(tmp_path / "png" / "00000.parquet", rows, encode_format="png")
    (missing,) = read_parquet(str(png), "00000.parquet", max_bytes=MAX_BYTES)
    assert missing["error"] == reasons.UNREADABLE
    assert "binary columns here: 'png': name one with --parquet-image-column" in missing["message"]


# ---------------------------------------------------------------- TFRecord


def test_img2dataset_tfrecord_is_read_from_key_and_jpg_without_options(tmp_path, images, caplog):
    rows = shard_rows(images, 1)
    path = write_tfrecord(tmp_path / "00001.tfrecord", img2dataset_examples(rows))

    with caplog.at_level(logging.INFO, logger="pipeline.formats.tfrecord"):
        got = outcome(read_tfrecord(str(path), "00001.tfrecord", max_bytes=MAX_BYTES))

    # img2dataset writes only its successes to TFRecord
    assert got == [(key, len(data)) for key, data, status, _ in rows if status == "success"]
    said = [r.getMessage() for r in caplog.records if "img2dataset" in r.getMessage()]
    assert said == [
        f"{path}: record 0 has no 'image/encoded' feature; read in img2dataset's layout: image 'jpg', id 'key'"
    ]


def test_img2dataset_detection_never_overrides_what_the_configured_features_read(tmp_path, images):
    a, b = list(images.values())[:2]
    examples = [
        tf_example({"image/id": b"both", "image/encoded": a, "key": b"k-both", "jpg": b}),  # the default wins
        tf_example({"image/id": b"named", "key": b"k-named", "png": b}),  # --encode_format png; image/id is the id
        tf_example({"jpg": b}),  # no img2dataset key: not its layout
        tf_example({"key": b"two", "jpg": a, "png": b}),  # two candidate images: no guess
    ]
    path = write_tfrecord(tmp_path / "mixed.tfrecord", examples)

    got = outcome(read_tfrecord(str(path), "mixed", max_bytes=MAX_BYTES))
    assert got == [
        ("both", len(a)),
        ("named", len(b)),
        ("mixed#2", reasons.EMPTY_FILE, "record has no 'image/encoded' feature (it has 'jpg'): "
         "name the image feature with --tfrecord-image"),
        ("mixed#3", reasons.EMPTY_FILE, "record has no 'image/encoded' feature (it has 'jpg', 'png'): "
         "name the image feature with --tfrecord-image"),
    ]  # fmt: skip

    # an image feature the user names is taken as named, whatever else the record holds
    named = outcome(read_tfrecord(str(path), "mixed", image_feature="image/png", max_bytes=MAX_BYTES))
    assert [row[1] for row in named] == [reasons.EMPTY_FILE] * 4
    # the two options the layout needed before still read it
    explicit = outcome(read_tfrecord(str(path), "mixed", key_feature="key", image_feature="jpg", max_bytes=MAX_BYTES))
    assert explicit[0] == ("k-both", len(b)) and explicit[3] == ("two", len(a))


# ---------------------------------------------------------------- WebDataset tar


def test_img2dataset_tar_gives_one_image_per_success_with_its_json_as_meta(tmp_path, images):
    rows = shard_rows(images, 2)
    path = write_img2dataset_tar(tmp_path / "00002.tar", rows)

    got = list(read_tar(str(path), "00002.tar", max_bytes=MAX_BYTES))

    assert [(i.id, i.uri.rsplit("#", 1)[1]) for i in got] == [
        (f"00002.tar/{key}", f"{key}.jpg") for key, _, status, _ in rows if status == "success"
    ]
    assert [json.loads(i.meta)["status"] for i in got] == ["success"] * 3


# ---------------------------------------------------------------- through the job


@pytest.mark.slow
def test_img2dataset_outputs_through_the_job_count_every_row(tmp_path, images):
    """One run over its Parquet, TFRecord and tar outputs (shards 0, 1, 2), as the docs' commands give them."""
    out = tmp_path / "i2d"
    parquet_rows, tfrecord_rows, tar_rows = (shard_rows(images, shard) for shard in range(3))
    write_img2dataset_parquet(out / "parquet" / "00000.parquet", parquet_rows)
    write_tfrecord(out / "tfrecord" / "00001.tfrecord", img2dataset_examples(tfrecord_rows))
    write_img2dataset_parquet(out / "tfrecord" / "00001.parquet", tfrecord_rows, encode_format=None)
    write_img2dataset_tar(out / "tar" / "00002.tar", tar_rows)
    inputs = [f"{out}/parquet/*.parquet", f"{out}/tfrecord/*.tfrecord", f"{out}/tar/*.tar"]
    cfg = EmbedConfig(
        input=",".join(inputs),
        output=str(tmp_path / "emb"),
        model=ModelConfig(weights="random", image_size=32),
        batch_size=4,
    )

    manifest = run_embed(cfg, workers=1)

    # 5 Parquet rows (3 images, 2 failed at the source) + 3 TFRecord records + 3 tar samples
    assert manifest["counts"] == {"seen": 11, "embedded": 9, "reused": 0, "failed": 2}
    assert manifest["failed_by_reason"] == {reasons.SOURCE_FAILED: 2}
    embedded = sorted(pq.read_table(tmp_path / "emb" / "embeddings").column("id").to_pylist())
    assert embedded == sorted(
        [k for k, _, s, _ in parquet_rows + tfrecord_rows if s == "success"]
        + [f"tar/00002.tar/{k}" for k, _, s, _ in tar_rows if s == "success"]  # ids relative to the shared root
    )
    errors = {r["id"]: r for r in pq.read_table(tmp_path / "emb" / "errors").to_pylist()}
    assert {rid: (r["error"], r["stage"]) for rid, r in errors.items()} == {
        "000000001": (reasons.SOURCE_FAILED, "read"),
        "000000003": (reasons.SOURCE_FAILED, "read"),
    }
    assert NOT_FOUND in errors["000000001"]["message"] and "'failed_to_download'" in errors["000000001"]["message"]
    assert errors["000000003"]["uri"].endswith("/parquet/00000.parquet#row=3")


def test_a_message_repeated_row_after_row_is_bounded_like_repeated_images(tmp_path):
    # 20,000 failed rows share one 5 MB message: a small file, but 1 KiB copied per row would
    # hand out 20 MB of messages, over the row group's bound (16 MiB for a file this small).
    rows = 20_000
    path = tmp_path / "repeat.parquet"
    zeros = pa.array([0] * rows, pa.int32())
    table = pa.table(
        {
            "key": pa.array([f"k{i}" for i in range(rows)]),
            "status": pa.DictionaryArray.from_arrays(zeros, pa.array(["failed_to_download"])),
            "error_message": pa.DictionaryArray.from_arrays(zeros, pa.array(["y" * 5_000_000])),
            "jpg": pa.array([None] * rows, pa.binary()),
        }
    )
    pq.write_table(table, path, row_group_size=rows)
    assert path.stat().st_size < 1_000_000

    got = list(read_parquet(str(path), "repeat", max_bytes=MAX_BYTES))

    *failed, last = got
    assert {row["error"] for row in failed} == {reasons.SOURCE_FAILED} and 10_000 < len(failed) < rows
    assert (last["id"], last["error"]) == (f"repeat#row={len(failed)}", reasons.TOO_LARGE)
    assert "repeats its values" in last["message"] and f"({rows - len(failed)}) lost" in last["message"]
