"""The real embedding job (pipeline.job.run_embed) over every input format.

Random seeded weights and 32x32 inputs keep it fast; what is checked is that
the same image content gets the same vector whatever it was stored in, that
damaged shards lose only what is damaged, and that worker count changes nothing.
"""

from __future__ import annotations

import hashlib
import pathlib

import numpy as np
import pyarrow.parquet as pq
import pytest
from shard_fixtures import (
    build_cross_format_corpus,
    image_examples,
    make_images,
    write_tar,
    write_tfrecord,
)

from pipeline.config import EmbedConfig, ModelConfig
from pipeline.formats import TRUNCATED_SHARD
from pipeline.job import run_embed

pytestmark = pytest.mark.slow

MODEL = ModelConfig(weights="random", image_size=32)


def _run(paths: list[str], out: pathlib.Path, *, workers: int = 1) -> tuple[dict, list[dict], list[dict]]:
    # A comma-separated spec string (format auto) is what `--input` passes today; ReadImages
    # turns it into an InputSpec (InputSpec objects themselves are tested in test_formats.py).
    cfg = EmbedConfig(input=",".join(paths), output=str(out), model=MODEL, batch_size=4)
    manifest = run_embed(cfg, workers=workers)
    rows = pq.read_table(out / "embeddings").to_pylist()
    errors = pq.read_table(out / "errors").to_pylist() if list((out / "errors").glob("*.parquet")) else []
    return manifest, rows, errors


def _format_of(uri: str) -> str:
    for fmt in ("tar", "tfrecord", "parquet"):
        if f"/{fmt}/" in uri:
            return fmt
    return "files"  # files/ and the CSV list both point at files/


@pytest.fixture(scope="module")
def cross_format(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    images = make_images(8, seed=3)
    inputs = build_cross_format_corpus(root, images)
    paths = [p for found in inputs.values() for p in found]
    manifest, rows, errors = _run(paths, root / "out")
    return images, paths, manifest, rows, errors


def test_every_format_gives_the_same_embedding_for_the_same_image(cross_format):
    images, _, manifest, rows, errors = cross_format
    assert errors == []
    assert manifest["counts"] == {"seen": 40, "embedded": 40, "reused": 0, "failed": 0}
    by_sha: dict[str, list[dict]] = {}
    for row in rows:
        by_sha.setdefault(row["content_sha256"], []).append(row)
    assert set(by_sha) == {hashlib.sha256(d).hexdigest() for d in images.values()}
    for sha, copies in by_sha.items():
        # files/, the CSV list (also files/), tar, tfrecord, parquet: five copies of each image
        assert sorted(_format_of(r["uri"]) for r in copies) == ["files", "files", "parquet", "tar", "tfrecord"], sha
        reference = np.asarray(copies[0]["embedding"], dtype=np.float32)
        assert np.abs(reference).sum() > 0
        for row in copies[1:]:
            # Same bytes, same decode, same model, same compiled batch shape: the same floats.
            np.testing.assert_array_equal(np.asarray(row["embedding"], dtype=np.float32), reference)


def test_ids_and_uris_point_back_to_the_source(cross_format):
    images, _, _, rows, _ = cross_format
    ids = {r["id"]: r["uri"] for r in rows}
    assert len(ids) == len(rows)  # unique across the five copies
    name = sorted(images)[0]
    assert ids[f"files/{name}.jpg"].endswith(f"/files/{name}.jpg")
    assert ids[f"csv-{name}"] == ids[f"files/{name}.jpg"]  # the list's relative URI, resolved and normalised
    assert ids[f"tar/shard-0.tar/{name}"].endswith(f"/tar/shard-0.tar#{name}.jpg")
    assert ids[f"tfr-{name}"].endswith("/tfrecord/part-0.tfrecord#0")
    assert ids[f"pq-{name}"].endswith("/parquet/part-0.parquet#row=0")
    last = sorted(images)[-1]
    assert ids[f"tar/shard-1.tar.gz/{last}"].endswith(f"/tar/shard-1.tar.gz#{last}.jpg")
    assert ids[f"tfr-{last}"].endswith("/tfrecord/part-1.tfrecord.gz#3")
    assert ids[f"pq-{last}"].endswith("/parquet/part-1.parquet#row=3")


def test_truncated_tar_and_tfrecord_lose_only_the_damaged_part(tmp_path):
    images = make_images(6, seed=5)
    items = list(images.items())
    good = write_tar(tmp_path / "in" / "good.tar", items)
    cut = write_tar(tmp_path / "in" / "cut.tar", items)
    raw = cut.read_bytes()
    # Cut inside the 4th image's bytes: its header (512 B) is at the end of the 3rd sample.
    starts = [raw.index(d) for _, d in items]
    cut.write_bytes(raw[: starts[3] + len(items[3][1]) // 2])
    tfr = write_tfrecord(tmp_path / "in" / "cut.tfrecord", image_examples(items))
    raw = tfr.read_bytes()
    tfr.write_bytes(raw[: raw.index(items[4][1]) + 100])  # inside the 5th record
    manifest, rows, errors = _run([str(good), str(cut), str(tfr)], tmp_path / "out")

    got = sorted(r["id"] for r in rows)
    keys = [k for k, _ in items]
    assert got == sorted([f"good.tar/{k}" for k in keys] + [f"cut.tar/{k}" for k in keys[:3]] + keys[:4])
    damage = sorted((e["id"], e["error"]) for e in errors)
    tar_header = starts[3] - 512  # the member whose bytes were cut starts with its header
    assert damage == [(f"cut.tar#offset={tar_header}", TRUNCATED_SHARD), ("cut.tfrecord#4", TRUNCATED_SHARD)]
    messages = {e["id"]: e["message"] for e in errors}
    assert f"{keys[3]}.jpg" in messages[f"cut.tar#offset={tar_header}"]
    assert "record 4" in messages["cut.tfrecord#4"]
    assert manifest["counts"]["seen"] == manifest["counts"]["embedded"] + manifest["counts"]["failed"] == 6 + 3 + 4 + 2
    assert manifest["failed_by_reason"] == {TRUNCATED_SHARD: 2}


def test_two_workers_give_the_same_rows_as_one(cross_format, tmp_path):
    _, paths, manifest, one, _ = cross_format
    manifest_two, two, errors_two = _run(paths, tmp_path / "two", workers=2)
    assert manifest_two["workers"] == 2 and errors_two == []

    def table(found):
        return sorted((r["id"], r["uri"], r["content_sha256"], r["width"], r["height"], r["model"]) for r in found)

    assert table(one) == table(two)
    assert len(two) == manifest["counts"]["embedded"] == 40
    vectors_one = {r["id"]: np.asarray(r["embedding"]) for r in one}
    for r in two:
        np.testing.assert_array_equal(np.asarray(r["embedding"]), vectors_one[r["id"]])
