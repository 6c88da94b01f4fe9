"""build_index on real Parquet datasets and real FAISS: every index type, the file contract, errors, atomicity.

Most datasets are 64-d (the index code takes the dimension from the data) so that the suite stays
fast; one test builds at the model's real 2048 dims.
"""

from __future__ import annotations

import argparse
import json
import os

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from index_fixtures import write_embeddings

from pipeline.cli import main
from pipeline.config import IndexConfig
from pipeline.index import build as build_module
from pipeline.index.build import build_index
from pipeline.index.io import scan_dataset
from pipeline.index.search import Searcher
from pipeline.index.train import prepare
from pipeline.records import embeddings_schema

MODEL = "resnet50-notop/avg/64x64/squash/caffe-bgr/fp32/random-seed:0"


def clustered(n: int, dim: int, *, seed: int = 0, clusters: int = 20, latent: int = 16) -> np.ndarray:
    """Seeded clustered vectors with low intrinsic dimension (like image embeddings), float32."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(clusters, latent))
    z = centers[rng.integers(0, clusters, n)] + 0.35 * rng.normal(size=(n, latent))
    mix = rng.normal(size=(latent, dim)) / np.sqrt(latent)
    return (z @ mix + 0.05 * rng.normal(size=(n, dim))).astype(np.float32)


def exact_neighbours(x: np.ndarray, rows: np.ndarray, metric: str, k: int = 10) -> np.ndarray:
    """Brute force in numpy (not FAISS): the k nearest other rows of each query row."""
    base = x / np.linalg.norm(x, axis=1, keepdims=True) if metric == "cosine" else x
    q = base[rows]
    if metric == "cosine":
        score = q @ base.T
    else:
        score = -((q**2).sum(1)[:, None] - 2 * q @ base.T + (base**2).sum(1)[None, :])
    score[np.arange(len(rows)), rows] = -np.inf  # the query itself is not its own neighbour
    return np.argsort(-score, axis=1)[:, :k]


def search_index(index_dir: str, x: np.ndarray, rows: np.ndarray, metric: str, k: int = 11) -> np.ndarray:
    """Labels found by index.faiss for the given rows, with the search params of index.json."""
    with open(os.path.join(index_dir, "index.json")) as handle:
        meta = json.load(handle)
    index = faiss.read_index(os.path.join(index_dir, "index.faiss"))
    space = faiss.ParameterSpace()
    for name, value in meta["search_params"].items():
        space.set_index_parameter(index, name, value)
    q = np.ascontiguousarray(x[rows])
    if metric == "cosine":
        faiss.normalize_L2(q)
    return index.search(q, k)[1]


def measured_recall(found: np.ndarray, truth: np.ndarray, rows: np.ndarray, k: int = 10) -> float:
    hits = sum(len(set([v for v in f if v != r][:k]) & set(t)) for f, t, r in zip(found, truth, rows))
    return hits / (k * len(rows))


@pytest.fixture(scope="module")
def data64(tmp_path_factory) -> tuple[str, np.ndarray]:
    x = clustered(3000, 64, seed=1)
    root = str(tmp_path_factory.mktemp("emb64"))
    write_embeddings(root, x, model=MODEL, files=3, model_config={"image_size": 64, "weights": "random"})
    return root, x


CASES = [  # (--index, metric, expected in the factory string, memory budget)
    ("flat", "cosine", "Flat", "4GB"),
    ("ivf-flat", "cosine", "IVF", "4GB"),
    ("ivf-flat", "l2", "IVF", "4GB"),
    ("ivf-sq8", "cosine", "SQ8", "4GB"),
    ("ivf-pq", "cosine", "OPQ32_64,IVF69,PQ32np", 230_000),  # the budget buys 32-byte codes
    ("hnsw", "cosine", "HNSW", "4GB"),
    ("IVF16,SQ8", "l2", "IVF16,SQ8", "4GB"),
]


@pytest.mark.parametrize(("kind", "metric", "factory_part", "budget"), CASES)
def test_each_index_type_finds_itself_and_meets_its_recall(data64, tmp_path, kind, metric, factory_part, budget):
    root, x = data64
    out = str(tmp_path / "index")
    meta = build_index(root, out, IndexConfig(index_type=kind, metric=metric, memory_budget=budget, seed=3))

    assert factory_part in meta["factory"]
    assert meta["index_type"] == (kind if "," not in kind else "custom")
    assert meta["ntotal"] == len(x) == faiss.read_index(f"{out}/index.faiss").ntotal
    assert meta["normalized"] is (metric == "cosine")
    # Cosine is inner product on unit vectors, except IVF-PQ: L2 on unit vectors (same order, see train.py).
    compare = "l2" if metric == "l2" or kind == "ivf-pq" else "inner_product"
    assert meta["faiss_metric"] == compare
    want = faiss.METRIC_L2 if compare == "l2" else faiss.METRIC_INNER_PRODUCT
    assert faiss.read_index(f"{out}/index.faiss").metric_type == want
    assert meta["bytes"] == os.path.getsize(f"{out}/index.faiss")
    if "IVF" in meta["factory"]:
        assert (
            1 <= meta["search_params"]["nprobe"] < faiss.extract_index_ivf(faiss.read_index(f"{out}/index.faiss")).nlist
        )
        assert meta["train_size"] > 0
    if kind == "hnsw":
        assert meta["search_params"]["efSearch"] >= 16

    # Independent check: every 10th row as a query, numpy brute force as the truth.
    rows = np.arange(0, len(x), 10)
    found = search_index(out, x, rows, metric)
    self_first = np.mean(found[:, 0] == rows)
    if kind == "hnsw":  # tuned for >= 99% on other queries; HNSW's parallel insertion is not deterministic
        assert self_first >= 0.98, self_first
    else:
        assert self_first == 1.0, "an indexed vector must be its own nearest neighbour"
    recall = measured_recall(found, exact_neighbours(x, rows, metric), rows)
    # index.json's figure is an estimate on 300 held-out queries; this one is on 300 others.
    assert recall >= meta["recall_at_10"] - 0.03, (recall, meta["recall_at_10"])
    if kind in ("flat",):
        assert meta["recall_at_10"] == 1.0 and recall == 1.0
    else:
        assert recall >= 0.9


def test_cosine_ivf_pq_scores_are_cosine_similarities(data64, tmp_path):
    """IVF-PQ ranks unit vectors by L2; Searcher reports cosines (1 - d/2), close to the exact ones."""
    root, x = data64
    out = str(tmp_path / "index")
    meta = build_index(root, out, IndexConfig(index_type="ivf-pq", memory_budget=230_000, seed=3))
    assert (meta["metric"], meta["faiss_metric"]) == ("cosine", "l2")
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    rows = np.arange(5, len(x), 97)
    with Searcher.open(out) as searcher:
        assert searcher.stats()["faiss_metric"] == "l2"
        results = searcher.search_vectors(x[rows] * 3.0, k=10)  # scale does not matter for cosine
    for own, hits in zip(rows, results):
        scores = np.array([h.score for h in hits])
        assert (np.diff(scores) <= 1e-6).all(), "best first: highest cosine"
        exact = unit[[h.label for h in hits]] @ unit[own]
        assert np.abs(scores - exact).max() < 0.05, (scores, exact)  # PQ codes: approximate
        assert hits[0].label == own and abs(hits[0].score - 1.0) < 0.05


def test_index_json_and_ids_parquet_follow_the_contract(data64, tmp_path):
    root, x = data64
    out = tmp_path / "index"
    meta = build_index(f"{root}/embeddings", str(out), IndexConfig(index_type="ivf-flat"))  # embeddings/ works too

    on_disk = json.loads((out / "index.json").read_text())
    assert on_disk == meta
    assert set(meta) == {
        "format_version", "factory", "index_type", "metric", "faiss_metric", "normalized", "dim", "ntotal", "model",
        "model_config", "source", "built_at", "build_seconds", "train_size", "search_params",
        "recall_at_10", "recall_queries", "bytes", "has_thumbnails", "embedpipe_version",
        "recall_at_10_low", "recall_target", "recall_target_met", "recall_warning", "tuning_queries", "tuning_curve",
    }  # fmt: skip
    assert meta["format_version"] == 1 and meta["dim"] == 64 and meta["model"] == MODEL
    assert meta["model_config"] == {"image_size": 64, "weights": "random"}
    assert meta["source"].endswith("/embeddings")
    assert meta["recall_queries"] == 300 and meta["has_thumbnails"] is False
    assert meta["built_at"].endswith("+00:00")
    assert sorted(os.listdir(out)) == ["ids.parquet", "index.faiss", "index.json"]
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")], "no staging directory left behind"

    ids = pq.read_table(out / "ids.parquet")
    assert ids.schema.names == ["label", "id", "uri"]
    assert ids.column("label").to_pylist() == list(range(len(x)))
    assert ids.column("id").to_pylist() == [f"img-{i:08d}.jpg" for i in range(len(x))]
    assert ids.column("uri")[5].as_py() == "file:///corpus/img-00000005.jpg"


def test_real_dimension_thumbnails_and_row_groups(tmp_path):
    n = 4100  # just over one 4096-row group of ids.parquet
    x = clustered(n, 2048, seed=7)
    thumbs = [b"\xff\xd8jpeg-%d" % i for i in range(n)]
    root = write_embeddings(str(tmp_path / "emb"), x, model=MODEL, files=2, thumbnails=thumbs)
    meta = build_index(root, str(tmp_path / "index"), IndexConfig(index_type="ivf-sq8", seed=0))

    assert meta["dim"] == 2048 and meta["ntotal"] == n and meta["has_thumbnails"] is True
    ids = pq.ParquetFile(tmp_path / "index" / "ids.parquet")
    assert ids.schema_arrow.names == ["label", "id", "uri", "thumbnail"]
    assert [ids.metadata.row_group(i).num_rows for i in range(ids.num_row_groups)] == [4096, 4]
    assert ids.read().column("thumbnail")[4099].as_py() == thumbs[4099]
    rows = np.arange(0, n, 41)
    found = search_index(str(tmp_path / "index"), x, rows, "cosine")
    assert (found[:, 0] == rows).all()
    assert measured_recall(found, exact_neighbours(x, rows, "cosine"), rows) >= meta["recall_at_10"] - 0.03


def test_training_sample_is_seeded_random_and_disjoint_from_the_eval_queries(data64):
    root, _ = data64
    ds = scan_dataset(root)

    def prepared(seed: int):
        # IVF4 needs only 200 training vectors, so the sample is a small part of the 3,000 rows
        return prepare(ds, IndexConfig(index_type="IVF4,Flat", seed=seed), batch_rows=256)

    a, again, other = prepared(5), prepared(5), prepared(6)
    assert a.train_size == len(a.train_labels) == 200
    assert not set(a.train_labels) & set(a.eval_labels), "eval queries are held out of training"
    assert not set(a.tune_labels) & set(a.eval_labels)
    assert len(a.eval_labels) == 300 and len(a.tune_labels) == 300
    train = np.sort(a.train_labels)
    assert not np.array_equal(train, np.arange(200)), "never the first rows"
    assert train.min() < 300 and train.max() > 2700 and len(set(train // 500)) == 6  # spread over all files
    assert np.array_equal(a.train_labels, again.train_labels) and np.array_equal(a.queries, again.queries)
    assert not np.array_equal(np.sort(a.train_labels), np.sort(other.train_labels))


def test_nprobe_is_the_smallest_reaching_the_target(data64, tmp_path):
    root, x = data64
    out = str(tmp_path / "index")
    meta = build_index(root, out, IndexConfig(index_type="ivf-flat", seed=2, recall_target=0.99))
    nprobe = meta["search_params"]["nprobe"]
    index = faiss.read_index(f"{out}/index.faiss")
    assert faiss.extract_index_ivf(index).nprobe == nprobe  # stored in index.faiss as well
    rows = np.arange(3, len(x), 7)
    truth = exact_neighbours(x, rows, "cosine")
    q = np.ascontiguousarray(x[rows])
    faiss.normalize_L2(q)

    def recall_at(p: int) -> float:
        faiss.extract_index_ivf(index).nprobe = p
        return measured_recall(index.search(q, 11)[1], truth, rows)

    assert recall_at(nprobe) >= 0.98
    if nprobe > 1:
        assert recall_at(max(1, nprobe // 2)) < recall_at(nprobe)


def _write_file(path: str, vectors: np.ndarray, model: str, ids: list[str]) -> None:
    n, dim = vectors.shape
    schema = embeddings_schema(dim)
    columns = {
        "id": ids,
        "uri": [f"file:///{i}" for i in ids],
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), dim),
        "content_sha256": ["0" * 64] * n,
        "width": pa.array([1] * n, pa.int32()),
        "height": pa.array([1] * n, pa.int32()),
        "model": [model] * n,
        "embedded_at": pa.array([0] * n, pa.timestamp("us", tz="UTC")),
    }
    for field in schema:  # optional columns of the schema: null
        if field.name not in columns and field.nullable:
            columns[field.name] = pa.nulls(n, field.type)
    pq.write_table(pa.table(columns, schema=schema), path)


def test_mixed_fingerprints_are_refused_naming_both(tmp_path):
    emb = tmp_path / "emb" / "embeddings"
    emb.mkdir(parents=True)
    _write_file(str(emb / "part-0.parquet"), clustered(50, 8), "model-A", [f"a{i}" for i in range(50)])
    _write_file(str(emb / "part-1.parquet"), clustered(50, 8, seed=2), "model-B", [f"b{i}" for i in range(50)])
    with pytest.raises(ValueError, match=r"different models") as err:
        build_index(str(tmp_path / "emb"), str(tmp_path / "index"))
    assert "model-A" in str(err.value) and "model-B" in str(err.value) and "part-1.parquet" in str(err.value)
    assert not (tmp_path / "index").exists()


def test_wrong_dimension_is_refused(tmp_path):
    emb = tmp_path / "emb" / "embeddings"
    emb.mkdir(parents=True)
    _write_file(str(emb / "part-0.parquet"), clustered(50, 8), MODEL, [f"a{i}" for i in range(50)])
    _write_file(str(emb / "part-1.parquet"), clustered(50, 16), MODEL, [f"b{i}" for i in range(50)])
    with pytest.raises(ValueError, match=r"different dimensions.*dim 8: part-0.parquet; dim 16: part-1.parquet"):
        build_index(str(tmp_path / "emb"), str(tmp_path / "index"))
    # and against the manifest: ResNet50 vectors are 2048-d
    root = write_embeddings(str(tmp_path / "emb2"), clustered(50, 8), model=MODEL)
    (tmp_path / "emb2" / "manifest.json").write_text(json.dumps({"model": MODEL, "embedding_dim": 2048}))
    with pytest.raises(
        ValueError, match=r"wrong dimension: .* 8-d vectors but its manifest.json says embedding_dim=2048"
    ):
        build_index(root, str(tmp_path / "index"))


def test_empty_dataset_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"empty dataset: no Parquet files"):
        build_index(str(tmp_path), str(tmp_path / "index"))
    emb = tmp_path / "emb" / "embeddings"
    emb.mkdir(parents=True)
    _write_file(str(emb / "part-0.parquet"), np.zeros((0, 8), np.float32), MODEL, [])
    with pytest.raises(ValueError, match=r"empty dataset: the Parquet files under .* hold no rows"):
        build_index(str(tmp_path / "emb"), str(tmp_path / "index"))


def test_bad_vectors_ids_and_options_are_refused(tmp_path):
    x = clustered(60, 8)
    x[42, 3] = np.nan
    root = write_embeddings(str(tmp_path / "nan"), x, model=MODEL)
    with pytest.raises(ValueError, match=r"img-00000042.jpg holds NaN"):
        build_index(root, str(tmp_path / "index"), IndexConfig(index_type="flat"))
    ids = [f"i{i}" for i in range(60)]
    ids[50] = "i7"
    root = write_embeddings(str(tmp_path / "dup"), clustered(60, 8), model=MODEL, ids=ids, files=2)
    with pytest.raises(ValueError, match=r"duplicate id 'i7'"):
        build_index(root, str(tmp_path / "index"))
    root = write_embeddings(str(tmp_path / "ok"), clustered(60, 8), model=MODEL)
    with pytest.raises(ValueError, match=r"metric must be one of"):
        build_index(root, str(tmp_path / "index"), IndexConfig(metric="dot"))
    with pytest.raises(ValueError, match=r"not a FAISS factory string"):
        build_index(root, str(tmp_path / "index"), IndexConfig(index_type="IVF-nonsense"))
    with pytest.raises(ValueError, match=r"is not a size"):
        build_index(root, str(tmp_path / "index"), IndexConfig(memory_budget="lots"))
    assert not (tmp_path / "index").exists()


def test_a_failure_mid_build_leaves_the_previous_index_whole(data64, tmp_path, monkeypatch):
    root, _ = data64
    out = tmp_path / "index"
    first = build_index(root, str(out), IndexConfig(index_type="flat"))
    before = {name: (out / name).read_bytes() for name in ("index.faiss", "ids.parquet", "index.json")}

    def crash(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(build_module, "write_json_atomic", crash)  # index.faiss and ids.parquet are staged by now
    with pytest.raises(OSError, match=r"simulated"):
        build_index(root, str(out), IndexConfig(index_type="ivf-flat"))
    assert {name: (out / name).read_bytes() for name in before} == before
    assert json.loads((out / "index.json").read_text()) == first
    assert sorted(os.listdir(tmp_path)) == ["index"], "the staging directory is removed"

    fresh = tmp_path / "fresh"
    with pytest.raises(OSError, match=r"simulated"):
        build_index(root, str(fresh), IndexConfig(index_type="ivf-flat"))
    assert not (fresh / "index.json").exists()


def test_cli_builds_and_prints_a_summary(data64, tmp_path, capsys):
    from pipeline.index.cli_build import add_index_parser

    parser = argparse.ArgumentParser(prog="embedpipe")
    add_index_parser(parser.add_subparsers(dest="command"))
    root, _ = data64
    argv = ["index", "--embeddings", root, "--output", str(tmp_path / "ix"), "--index-type", "ivf-flat", "--seed", "1"]
    args, beam_args = parser.parse_known_args(argv)
    assert args.index_seed == 1  # --seed is --index-seed's other spelling in `index`
    args.func(args, beam_args)
    text = capsys.readouterr().out
    meta = json.loads((tmp_path / "ix" / "index.json").read_text())
    assert f"ivf-flat ({meta['factory']}, cosine)" in text
    assert (
        f"recall@10  {meta['recall_at_10']:.3f} on 300 held-out queries (nprobe={meta['search_params']['nprobe']})"
        in text
    )
    assert "vectors    3000 x 64" in text and str(tmp_path / "ix") in text

    distributed = [*argv[:4], str(tmp_path / "d"), "--distributed", "--index-type", "IVF8,Flat"]
    args, beam_args = parser.parse_known_args(distributed)
    args.func(args, beam_args)
    assert json.loads((tmp_path / "d" / "index.json").read_text())["factory"] == "IVF8,Flat"

    index_parser = next(a for a in parser._actions if a.dest == "command").choices["index"]
    options = {o for a in index_parser._actions for o in a.option_strings if a.dest != "help" and a.help}
    assert options >= {"--embeddings", "--output", "--index-type", "--metric", "--memory-budget", "--distributed"}
    assert options >= {"--workers", "--index-seed", "--seed", "--recall-target", "--index"}, "every option has help"


def test_cli_refuses_embeddings_without_a_manifest(tmp_path, capsys):
    root = write_embeddings(str(tmp_path / "half"), clustered(200, 16), model=MODEL)
    os.remove(tmp_path / "half" / "manifest.json")  # what an embed run that never finished leaves behind
    argv = ["index", "--output", str(tmp_path / "ix"), "--index", "flat"]
    for target in (root, f"{root}/embeddings"):
        assert main([*argv, "--embeddings", target]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(
            f"embedpipe: error: {root}/manifest.json is missing, so {root}/embeddings is an unfinished"
        )
        assert "\n" not in err and err.endswith("or pass --allow-no-manifest to index these files as they are")
    assert not (tmp_path / "ix").exists()
    assert main([*argv, "--embeddings", root, "--allow-no-manifest"]) == 0
    assert json.loads((tmp_path / "ix" / "index.json").read_text())["ntotal"] == 200
