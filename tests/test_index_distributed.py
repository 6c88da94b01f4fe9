"""build_index_distributed (a real Beam pipeline on the FnApiRunner) equals the single-process build."""

from __future__ import annotations

import json
import logging
import pathlib

import faiss
import numpy as np
import pyarrow.parquet as pq
import pytest
from test_index_build import MODEL, clustered

from pipeline.index.build import build_index
from pipeline.index.distributed import build_index_distributed
from pipeline.index.io import write_embeddings

# What legitimately differs between two builds of the same index.
VOLATILE = {"built_at", "build_seconds"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[str, np.ndarray]:
    x = clustered(3000, 64, seed=11)
    root = str(tmp_path_factory.mktemp("emb"))
    write_embeddings(root, x, model=MODEL, files=4)
    return root, x


def _search(index_dir: str, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    index = faiss.read_index(f"{index_dir}/index.faiss")
    q = np.ascontiguousarray(x[::7])
    faiss.normalize_L2(q)
    return index.search(q, 10)


def _same_build(a: str, b: str, x: np.ndarray) -> dict:
    meta_a = json.loads(pathlib.Path(f"{a}/index.json").read_text())
    meta_b = json.loads(pathlib.Path(f"{b}/index.json").read_text())
    assert {k: v for k, v in meta_a.items() if k not in VOLATILE} == {
        k: v for k, v in meta_b.items() if k not in VOLATILE
    }
    da, ia = _search(a, x)
    db, ib = _search(b, x)
    np.testing.assert_array_equal(ia, ib)
    np.testing.assert_array_equal(da, db)
    assert pq.read_table(f"{a}/ids.parquet").equals(pq.read_table(f"{b}/ids.parquet"))
    return meta_a


@pytest.mark.parametrize(
    ("kind", "workers", "budget"),
    [("ivf-flat", 2, "4GB"), ("ivf-pq", 1, 200_000)],  # 2 worker processes; OPQ pre-transform + PQ codes
)
def test_distributed_build_equals_single_process(dataset, tmp_path, caplog, kind, workers, budget):
    root, x = dataset
    caplog.set_level(logging.INFO, logger="pipeline.index")
    single = build_index(root, str(tmp_path / "single"), index=kind, seed=4, memory_budget=budget)
    spread = build_index_distributed(
        root, str(tmp_path / "spread"), index=kind, seed=4, memory_budget=budget, workers=workers
    )
    if kind == "ivf-pq":
        assert spread["factory"].startswith("OPQ16_64,")
    assert "adding 4 files in parallel" in caplog.text  # really went through the Beam pipeline
    meta = _same_build(str(tmp_path / "single"), str(tmp_path / "spread"), x)
    assert meta == {**spread, **{k: meta[k] for k in VOLATILE}}
    assert single["ntotal"] == spread["ntotal"] == len(x)
    # Same trained index + same order of the inverted lists => the very same file.
    assert (tmp_path / "single" / "index.faiss").read_bytes() == (tmp_path / "spread" / "index.faiss").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["single", "spread"], "staging removed"


def test_flat_and_hnsw_fall_back_to_one_process_and_say_why(dataset, tmp_path, caplog):
    root, x = dataset
    caplog.set_level(logging.INFO, logger="pipeline.index")
    build_index(root, str(tmp_path / "single"), index="hnsw")
    build_index_distributed(root, str(tmp_path / "spread"), index="hnsw")
    assert "an HNSW graph cannot be merged" in caplog.text
    assert "adding 4 files in parallel" not in caplog.text
    _same_build(str(tmp_path / "single"), str(tmp_path / "spread"), x)
    build_index_distributed(root, str(tmp_path / "flat"), index="flat")
    assert "adding to a flat index is a copy" in caplog.text


def test_distributed_errors_are_as_clear_as_single_process(tmp_path):
    root = write_embeddings(str(tmp_path / "emb"), clustered(40, 8), model=MODEL)
    (tmp_path / "emb" / "manifest.json").write_text(json.dumps({"model": "some-other-model"}))
    with pytest.raises(ValueError, match=r"manifest.json names 'some-other-model'"):
        build_index_distributed(root, str(tmp_path / "index"))
    assert not (tmp_path / "index").exists()
