"""Searcher on small seeded indexes written with FAISS (tests/index_fixtures.py)."""

from __future__ import annotations

import io
import json
import pathlib
import shutil

import faiss
import numpy as np
import pyarrow.parquet as pq
import pytest
from index_fixtures import (
    FakeRemoteFileSystem,
    clustered,
    exact_neighbours,
    model_config_dict,
    png_bytes,
    shared_photo_index,
    swatch_jpeg,
    write_index_dir,
)
from PIL import Image

from pipeline import reasons
from pipeline.config import ModelConfig
from pipeline.index.search import (
    Hit,
    IndexFormatError,
    ModelMismatchError,
    QueryImageError,
    Searcher,
    UnknownIdError,
)
from pipeline.sample import jpeg_bytes

N, DIM = 600, 32
# One thread: the FAISS calls here are tiny, and the test machine is shared.
faiss.omp_set_num_threads(1)


@pytest.fixture(scope="module")
def vectors() -> np.ndarray:
    return clustered(N, DIM, seed=1)


def _ids(labels) -> list[str]:
    return [f"item-{i:05d}" for i in labels]


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_flat_search_equals_brute_force(tmp_path, vectors, metric):
    with Searcher.open(write_index_dir(tmp_path, vectors, metric=metric)) as s:
        queries = clustered(7, DIM, seed=99)
        hits = s.search_vectors(queries, k=10)
        scores, labels = exact_neighbours(vectors, queries, 10, metric)
        for row, want_labels, want_scores in zip(hits, labels, scores):
            assert [h.label for h in row] == list(want_labels)
            assert [h.id for h in row] == _ids(want_labels)
            assert [h.rank for h in row] == list(range(1, 11))
            # cosine: similarity, descending; l2: Euclidean (not squared) distance, ascending.
            np.testing.assert_allclose([h.score for h in row], want_scores, rtol=1e-4, atol=1e-4)
            assert all(row[i].uri == f"file:///corpus/{row[i].id}" for i in range(10))


@pytest.mark.parametrize(
    "factory,params",
    [
        ("Flat", {}),
        ("IVF16,Flat", {"nprobe": 4}),
        ("IVF16,SQ8", {"nprobe": 4}),
        ("IVF16,PQ8x4np", {"nprobe": 4}),
        ("HNSW16,Flat", {"efSearch": 32}),
        ("RR32,IVF16,Flat", {"nprobe": 4}),  # IVF inside a pre-transform (as OPQ builds are)
    ],
)
@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_search_by_id_returns_the_item_first(tmp_path, vectors, factory, params, metric):
    d = write_index_dir(tmp_path, vectors, factory=factory, metric=metric, search_params=params)
    with Searcher.open(d) as s:
        labels = list(range(0, N, 37))
        results = s.search_ids(_ids(labels), k=8)
        for label, row in zip(labels, results):
            assert row[0].id == f"item-{label:05d}" and row[0].rank == 1 and row[0].label == label
            assert [h.rank for h in row] == list(range(1, 9))
            assert len({h.label for h in row}) == 8
            # The other hits are what a vector search with the stored vector finds.
            by_vector = s.search_vectors(s.vector_of(label), k=8)[0]
            others = [h.label for h in by_vector if h.label != label]
            assert [h.label for h in row[1:]] == others[:7]


def test_search_by_id_breaks_ties_in_favour_of_the_item(tmp_path, vectors):
    # Items 10 and 11 hold the same vector: searching either must return itself first.
    dup = vectors.copy()
    dup[11] = dup[10]
    with Searcher.open(write_index_dir(tmp_path, dup)) as s:
        first = s.search_ids(["item-00010", "item-00011"], k=3)
        assert [r[0].id for r in first] == ["item-00010", "item-00011"]
        assert {first[0][1].id, first[1][1].id} == {"item-00011", "item-00010"}
        assert first[0][0].score == pytest.approx(first[0][1].score, abs=1e-5)


def test_search_params_from_index_json_are_applied(tmp_path, vectors):
    d = write_index_dir(tmp_path, vectors, factory="IVF16,Flat", search_params={"nprobe": 1})
    queries = clustered(40, DIM, seed=5, spread=0.6)
    _, truth = exact_neighbours(vectors, queries, 10, "cosine")
    with Searcher.open(d) as s:
        assert faiss.extract_index_ivf(s.index).nprobe == 1
        narrow = [[h.label for h in row] for row in s.search_vectors(queries, k=10)]
    with Searcher.open(d, search_params={"nprobe": 16}) as s:
        assert s.stats()["search_params"] == {"nprobe": 16}
        full = [[h.label for h in row] for row in s.search_vectors(queries, k=10)]
    # Probing every list is exact; one list of 16 is not.
    assert full == [list(t) for t in truth]
    assert narrow != full


def test_hnsw_ef_search_is_applied(tmp_path, vectors):
    d = write_index_dir(tmp_path, vectors, factory="HNSW16,Flat", search_params={"efSearch": 77})
    with Searcher.open(d) as s:
        assert s.index.hnsw.efSearch == 77


def test_k_larger_than_index_and_bad_queries(tmp_path, vectors):
    with Searcher.open(write_index_dir(tmp_path, vectors[:5])) as s:
        assert [len(r) for r in s.search_vectors(vectors[:2], k=50)] == [5, 5]
        assert len(s.search_ids(["item-00003"], k=1000)[0]) == 5
        for bad_k in (0, -1, 2.5, True):
            with pytest.raises(ValueError, match="k must be a positive integer"):
                s.search_vectors(vectors[:1], k=bad_k)
        with pytest.raises(ValueError, match=r"shape \(n, 32\)"):
            s.search_vectors(np.zeros((1, 31), np.float32))
        with pytest.raises(ValueError, match="NaN"):
            s.search_vectors(np.full((1, 32), np.nan, np.float32))
        assert s.search_vectors(np.zeros((0, 32), np.float32)) == []
        with pytest.raises(UnknownIdError, match="'nope' is not in the index") as info:
            s.search_ids(["item-00001", "nope"])
        assert isinstance(info.value, KeyError)
        with pytest.raises(TypeError):
            s.search_ids("item-00001")


def test_thumbnails_across_row_groups(tmp_path, vectors):
    n = 23
    thumbs = [swatch_jpeg(i) for i in range(n)]
    thumbs[4] = None  # an image whose thumbnail could not be made
    d = write_index_dir(tmp_path, vectors[:n], thumbnails=thumbs, row_group_size=5)
    with Searcher.open(d) as s:
        assert s.has_thumbnails and s.stats()["has_thumbnails"]
        for i in (22, 0, 7, 4, 13, 22, 5, 19):
            assert s.thumbnail(f"item-{i:05d}") == thumbs[i]
        assert Image.open(io.BytesIO(s.thumbnail("item-00007"))).format == "JPEG"
        with pytest.raises(UnknownIdError):
            s.thumbnail("nope")
    with Searcher.open(write_index_dir(tmp_path / "plain", vectors[:n])) as s:
        assert not s.has_thumbnails and s.thumbnail("item-00001") is None


def test_ivf_index_is_memory_mapped(tmp_path, vectors):
    d = write_index_dir(tmp_path, vectors, factory="IVF16,Flat", search_params={"nprobe": 16})
    with Searcher.open(d) as s, Searcher.open(d, mmap=False) as plain:
        assert s.stats()["memory_mapped"] is True and plain.stats()["memory_mapped"] is False
        a = s.search_ids(["item-00042"], k=10)[0]
        assert a == plain.search_ids(["item-00042"], k=10)[0]


def test_remote_index_is_copied_and_cleaned_up(tmp_path, vectors):
    write_index_dir(tmp_path / "bucket" / "runs" / "r1" / "index", vectors)
    FakeRemoteFileSystem.root = str(tmp_path / "bucket")
    s = Searcher.open("fakeremote://runs/r1/index")
    local = pathlib.Path(s._temp_dir)
    assert sorted(p.name for p in local.iterdir()) == ["ids.parquet", "index.faiss", "index.json"]
    assert s.search_ids(["item-00009"], k=1)[0][0].id == "item-00009"
    assert s.stats()["index_dir"] == "fakeremote://runs/r1/index"
    s.close()
    assert not local.exists()
    with pytest.raises(IndexFormatError, match="does not exist"):
        Searcher.open("fakeremote://runs/missing/index")


def test_broken_index_directories_are_clear_errors(tmp_path, vectors):
    with pytest.raises(IndexFormatError, match="no index directory"):
        Searcher.open(str(tmp_path / "absent"))
    good = write_index_dir(tmp_path / "good", vectors[:50])

    def variant(name: str) -> pathlib.Path:
        out = tmp_path / name
        shutil.copytree(good, out)
        return out

    d = variant("newer")
    meta = json.loads((d / "index.json").read_text())
    (d / "index.json").write_text(json.dumps({**meta, "format_version": 2}))
    with pytest.raises(IndexFormatError, match="format_version 2"):
        Searcher.open(str(d))

    d = variant("metric")
    (d / "index.json").write_text(json.dumps({**meta, "metric": "l2", "normalized": False}))
    with pytest.raises(IndexFormatError, match="metric"):
        Searcher.open(str(d))

    d = variant("faiss-metric")  # an l2 index cannot have been built with inner product
    (d / "index.json").write_text(json.dumps({**meta, "metric": "l2", "faiss_metric": "inner_product"}))
    with pytest.raises(IndexFormatError, match="faiss_metric 'inner_product'"):
        Searcher.open(str(d))

    d = variant("cosine-as-l2")  # index.json claims L2 comparisons; index.faiss is inner product
    (d / "index.json").write_text(json.dumps({**meta, "faiss_metric": "l2"}))
    with pytest.raises(IndexFormatError, match="faiss_metric 'l2'"):
        Searcher.open(str(d))

    d = variant("short-ids")
    table = pq.read_table(d / "ids.parquet")
    pq.write_table(table.slice(0, 49), d / "ids.parquet")
    with pytest.raises(IndexFormatError, match=r"labels 0..49"):
        Searcher.open(str(d))

    d = variant("mixed")
    shutil.copy(write_index_dir(tmp_path / "other", vectors[:60]) + "/index.faiss", d / "index.faiss")
    with pytest.raises(IndexFormatError, match="mixes two builds"):
        Searcher.open(str(d))

    d = variant("no-faiss")
    (d / "index.faiss").unlink()
    with pytest.raises(IndexFormatError, match=r"index\.faiss is missing"):
        Searcher.open(str(d))


def test_image_search_refused_without_a_matching_model(tmp_path, vectors):
    d = write_index_dir(tmp_path / "a", vectors[:20])  # synthetic vectors: no model_config
    image = jpeg_bytes(Image.new("RGB", (40, 40), (200, 10, 10)))
    with Searcher.open(d) as s:
        with pytest.raises(ModelMismatchError, match="records no model_config"):
            s.search_images([image])
        stats = s.stats()
        assert stats["image_search"] is False and "no model_config" in stats["image_search_error"]
        assert s.search_ids(["item-00001"], k=2)[0][0].id == "item-00001"  # the rest still works

    cfg = ModelConfig(image_size=32, weights="random", seed=1)
    recorded = {**model_config_dict(cfg), "seed": 2}  # claims other weights than the vectors came from
    d = write_index_dir(tmp_path / "b", vectors[:20], model=cfg.fingerprint(), model_config=recorded)
    with Searcher.open(d) as s, pytest.raises(ModelMismatchError, match="refusing to embed query images"):
        s.search_images([image])

    d = write_index_dir(tmp_path / "c", vectors[:20], model=cfg.fingerprint(), model_config={"image_size": 8})
    with Searcher.open(d) as s, pytest.raises(ModelMismatchError, match="cannot rebuild"):
        s.search_images([image])


# ---- real photos, embedded with a real (random-weight) model ------------------------------------


@pytest.fixture(scope="module")
def photos_index():
    return shared_photo_index(32)


@pytest.fixture(scope="module")
def photo_searcher(photos_index):
    with Searcher.open(photos_index[0], batch_size=4) as s:
        yield s


def test_search_images_finds_each_photo_first(photo_searcher, photos_index):
    _, files = photos_index
    by_path = photo_searcher.search_images(list(files.values()), k=3)
    by_bytes = photo_searcher.search_images([pathlib.Path(p).read_bytes() for p in files.values()], k=3)
    by_id = photo_searcher.search_ids(list(files), k=3)
    for image_id, a, b, c in zip(files, by_path, by_bytes, by_id):
        # The query is decoded and embedded exactly as the index was: score 1.
        assert a[0].id == image_id and a[0].score == pytest.approx(1.0, abs=1e-4)
        assert [h.id for h in a] == [h.id for h in b] == [h.id for h in c]
        assert all(isinstance(h, Hit) for h in a)
        np.testing.assert_allclose([h.score for h in a], [h.score for h in c], atol=1e-4)


def test_search_images_other_formats_and_bad_images(photo_searcher, photos_index, tmp_path):
    _, files = photos_index
    chelsea = Image.open(files["chelsea.jpg"])
    assert photo_searcher.search_images([png_bytes(chelsea)], k=1)[0][0].id == "chelsea.jpg"
    with pytest.raises(QueryImageError, match="#2") as info:
        photo_searcher.search_images([png_bytes(chelsea), b"not an image at all"])
    assert info.value.reason == reasons.NOT_AN_IMAGE
    with pytest.raises(QueryImageError) as info:
        photo_searcher.search_images([png_bytes(chelsea)], max_pixels=100)
    assert info.value.reason == reasons.TOO_MANY_PIXELS
    with pytest.raises(QueryImageError) as info:
        photo_searcher.search_images([str(tmp_path / "missing.jpg")])
    assert info.value.reason == reasons.UNREADABLE and "missing.jpg" in str(info.value)


def test_photo_index_stats_and_thumbnails(photo_searcher, photos_index):
    _, files = photos_index
    stats = photo_searcher.stats()
    assert stats["ntotal"] == len(files) and stats["dim"] == 2048
    assert stats["image_search"] is True and stats["image_search_error"] is None
    assert stats["model"] == ModelConfig(image_size=32, weights="random").fingerprint()
    thumb = Image.open(io.BytesIO(photo_searcher.thumbnail("rocket.jpg")))
    assert thumb.format == "JPEG" and max(thumb.size) == 128
