"""DedupIds: one row per id, the copy with the smallest uri (natural order) wins, the rest are errors."""

from __future__ import annotations

import datetime
import hashlib

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from shard_fixtures import image_examples, make_images, write_parquet, write_tar, write_tfrecord

from pipeline import reasons, records
from pipeline.config import ModelConfig
from pipeline.decode import DecodeImages
from pipeline.dedup import DedupIds, natural_key
from pipeline.embed import EmbedImages
from pipeline.read import InputSpec, ReadImages

NOW = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)


def test_natural_key_compares_positions_as_numbers():
    uris = ["s-10.tfrecord#2", "s-2.tfrecord#10", "s-2.tfrecord#9", "p.parquet#row=100", "p.parquet#row=11"]
    assert sorted(uris, key=natural_key) == [
        "p.parquet#row=11",
        "p.parquet#row=100",
        "s-2.tfrecord#9",
        "s-2.tfrecord#10",
        "s-10.tfrecord#2",
    ]


def _embedding(rid: str, uri: str, sha: str) -> dict:
    image = records.DecodedImage(rid, uri, np.zeros((1, 1, 3), np.uint8), sha, 1, 1)
    return records.embedding_row(image, np.full(4, len(uri), np.float32), "model", NOW)


@pytest.mark.parametrize("seed", [0, 1])
def test_first_copy_wins_whatever_the_input_order(seed):
    embeddings = [
        _embedding("a", "s.tfrecord#10", "sha-a10"),
        _embedding("a", "s.tfrecord#9", "sha-a9"),
        _embedding("b", "p-10.parquet#row=0", "sha-b10"),
        _embedding("c", "t.tar#c.jpg", "sha-c"),
    ]
    errors = [
        records.error_row("b", "p-2.parquet#row=0", "decode", reasons.DECODE_ERROR, "bad", "sha-b2"),
        records.error_row("d", "x.tar#offset=0", "read", "truncated_shard", "cut"),
    ]
    rng = np.random.default_rng(seed)
    embeddings = [embeddings[i] for i in rng.permutation(len(embeddings))]
    errors = [errors[i] for i in rng.permutation(len(errors))]
    with TestPipeline(runner="FnApiRunner") as p:
        kept = (
            p | "Embeddings" >> beam.Create(embeddings),
            p | "Errors" >> beam.Create(errors),
        ) | "DedupIds" >> DedupIds()
        assert_that(
            kept["embeddings"] | "E" >> beam.Map(lambda r: (r["id"], r["uri"], float(r["embedding"][0]))),
            equal_to([("a", "s.tfrecord#9", 12.0), ("c", "t.tar#c.jpg", 11.0)]),
            label="Embeddings",
        )
        assert_that(
            kept["errors"] | "R" >> beam.Map(lambda r: (r["id"], r["uri"], r["error"], r["content_sha256"])),
            equal_to(
                [
                    ("a", "s.tfrecord#10", reasons.DUPLICATE_ID, "sha-a10"),
                    ("b", "p-2.parquet#row=0", reasons.DECODE_ERROR, "sha-b2"),  # the winner keeps its own error
                    ("b", "p-10.parquet#row=0", reasons.DUPLICATE_ID, "sha-b10"),
                    ("d", "x.tar#offset=0", "truncated_shard", None),
                ]
            ),
            label="Errors",
        )


@pytest.mark.slow
def test_duplicate_ids_within_and_across_shards_through_the_real_stages(tmp_path):
    images = make_images(6, seed=31)
    (n0, d0), (n1, d1), (n2, d2), (n3, d3), (n4, d4), (n5, d5) = images.items()
    # Within a shard: a tar sample with two image fields; a TFRecord with one key twice.
    tar = write_tar(tmp_path / "t.tar", [(n0, d0)], extra={f"{n0}.png": d1})
    tfr = write_tfrecord(tmp_path / "r.tfrecord", image_examples([("same", d2), ("other", d3), ("same", d4)]))
    # Across shards: the same key in two Parquet files (natural order: p-2 before p-10).
    p2 = write_parquet(tmp_path / "p-2.parquet", [("dup", d5)])
    p10 = write_parquet(tmp_path / "p-10.parquet", [("dup", d0), ("own", d1)])
    spec = InputSpec(paths=(str(tar), str(tfr), f"{tmp_path}/*.parquet"))
    sha = {n: hashlib.sha256(d).hexdigest() for n, d in images.items()}

    with TestPipeline(runner="FnApiRunner") as p:
        read = p | "ReadImages" >> ReadImages(spec, max_bytes=10_000_000)
        decoded = read["images"] | "DecodeImages" >> DecodeImages(size=32, max_pixels=10_000_000)
        embedded = decoded.decoded | "EmbedImages" >> EmbedImages(
            ModelConfig(weights="random", image_size=32), batch_size=4, embedded_at=NOW
        )
        errors = (read["errors"], decoded.errors, embedded.errors) | "AllErrors" >> beam.Flatten()
        kept = (embedded.embeddings, errors) | "DedupIds" >> DedupIds()
        assert_that(
            kept["embeddings"] | "E" >> beam.Map(lambda r: (r["id"], r["uri"], r["content_sha256"])),
            equal_to(
                [
                    (f"t.tar/{n0}", f"{tar}#{n0}.jpg", sha[n0]),
                    ("same", f"{tfr}#0", sha[n2]),
                    ("other", f"{tfr}#1", sha[n3]),
                    ("dup", f"{p2}#row=0", sha[n5]),
                    ("own", f"{p10}#row=1", sha[n1]),
                ]
            ),
            label="Embeddings",
        )
        assert_that(
            kept["errors"] | "R" >> beam.Map(lambda r: (r["id"], r["uri"], r["error"], r["content_sha256"])),
            equal_to(
                [
                    (f"t.tar/{n0}", f"{tar}#{n0}.png", reasons.DUPLICATE_ID, sha[n1]),
                    ("same", f"{tfr}#2", reasons.DUPLICATE_ID, sha[n4]),
                    ("dup", f"{p10}#row=0", reasons.DUPLICATE_ID, sha[n0]),
                ]
            ),
            label="Errors",
        )


@pytest.mark.slow
def test_rerun_with_a_duplicate_id_reuses_one_row_and_reports_the_copy(tmp_path):
    """The same key, same bytes, in two Parquet shards: night 1 embeds one copy and reports the
    other as duplicate_id; night 2 (nothing changed) reuses one row and reports the other copy
    again, and the counts still add up (they once raised CountsMismatchError)."""
    from pipeline.config import EmbedConfig
    from pipeline.job import run_embed
    from pipeline.storage import parquet_files

    images = make_images(3, seed=4)
    samples = list(images.items())
    write_parquet(tmp_path / "in" / "a.parquet", samples)
    write_parquet(tmp_path / "in" / "b.parquet", samples[:1])  # samples[0]'s key again, same bytes
    model = ModelConfig(weights="random", image_size=32)
    spec = InputSpec(paths=(str(tmp_path / "in" / "*.parquet"),))
    first = run_embed(EmbedConfig(input=spec, output=str(tmp_path / "n1"), model=model, batch_size=2))
    assert first["counts"] == {"seen": 4, "embedded": 3, "reused": 0, "failed": 1}
    second = run_embed(
        EmbedConfig(input=spec, output=str(tmp_path / "n2"), model=model, batch_size=2),
        previous_files=parquet_files(str(tmp_path / "n1" / "embeddings")),
    )
    assert second["counts"]["seen"] == 4
    assert (second["counts"]["embedded"], second["counts"]["reused"], second["counts"]["failed"]) == (0, 3, 1)
    assert second["failed_by_reason"] == {"duplicate_id": 1}
