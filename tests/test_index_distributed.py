"""build_index_distributed (a real Beam pipeline on the FnApiRunner) equals the single-process build."""

from __future__ import annotations

import json
import logging
import os
import pathlib
import shutil

import faiss
import numpy as np
import pyarrow.parquet as pq
import pytest
from apache_beam.io.filesystem import FileMetadata, MatchResult
from apache_beam.io.localfilesystem import LocalFileSystem
from index_fixtures import write_embeddings
from test_index_build import MODEL, clustered

from pipeline.config import IndexConfig
from pipeline.index.build import build_index
from pipeline.index.distributed import build_index_distributed

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
    single = build_index(root, str(tmp_path / "single"), IndexConfig(index_type=kind, seed=4, memory_budget=budget))
    spread = build_index_distributed(
        root, str(tmp_path / "spread"), IndexConfig(index_type=kind, seed=4, memory_budget=budget), workers=workers
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
    build_index(root, str(tmp_path / "single"), IndexConfig(index_type="hnsw"))
    build_index_distributed(root, str(tmp_path / "spread"), IndexConfig(index_type="hnsw"))
    assert "an HNSW graph cannot be merged" in caplog.text
    assert "adding 4 files in parallel" not in caplog.text
    _same_build(str(tmp_path / "single"), str(tmp_path / "spread"), x)
    build_index_distributed(root, str(tmp_path / "flat"), IndexConfig(index_type="flat"))
    assert "adding to a flat index is a copy" in caplog.text


def test_distributed_errors_are_as_clear_as_single_process(tmp_path):
    root = write_embeddings(str(tmp_path / "emb"), clustered(40, 8), model=MODEL)
    (tmp_path / "emb" / "manifest.json").write_text(json.dumps({"model": "some-other-model"}))
    with pytest.raises(ValueError, match=r"manifest.json names 'some-other-model'"):
        build_index_distributed(root, str(tmp_path / "index"))
    assert not (tmp_path / "index").exists()


class FakeGcs(LocalFileSystem):
    """`fakegs://PATH` served from a local folder: only the object-store boundary is faked.

    Our code reaches it through Beam's FileSystems exactly as it would reach gs://, so the
    remote code paths run (FAISS files via local temporaries, renames, staging beside the output).
    """

    root = "/nonexistent"
    prefix = "fakegs://"

    @classmethod
    def scheme(cls) -> str:
        return "fakegs"

    def _local(self, path: str) -> str:
        return os.path.join(self.root, path[len(self.prefix) :]) if path.startswith(self.prefix) else path

    def join(self, basepath: str, *paths: str) -> str:
        return "/".join([basepath.rstrip("/"), *paths])

    def match(self, patterns, limits=None):
        results = super().match([self._local(p) for p in patterns], limits)
        out = []
        for pattern, result in zip(patterns, results):
            if pattern.startswith(self.prefix):
                found = [
                    FileMetadata(self.prefix + os.path.relpath(m.path, self.root), m.size_in_bytes)
                    for m in result.metadata_list
                ]
                result = MatchResult(pattern, found)
            out.append(result)
        return out

    def create(self, path, mime_type="application/octet-stream", compression_type="auto"):
        return super().create(self._local(path), mime_type, compression_type)

    def open(self, path, mime_type="application/octet-stream", compression_type="auto"):
        return super().open(self._local(path), mime_type, compression_type)

    def mkdirs(self, path) -> None:
        os.makedirs(self._local(path), exist_ok=True)

    def exists(self, path) -> bool:
        return super().exists(self._local(path))

    def rename(self, source_file_names, destination_file_names) -> None:
        super().rename([self._local(p) for p in source_file_names], [self._local(p) for p in destination_file_names])

    def delete(self, paths) -> None:
        super().delete([self._local(p) for p in paths])


def test_object_store_paths_build_the_same_index(dataset, tmp_path):
    root, _ = dataset
    FakeGcs.root = str(tmp_path)
    shutil.copytree(root, tmp_path / "bucket" / "run")
    local = build_index(root, str(tmp_path / "local"), IndexConfig(index_type="ivf-sq8", seed=1))
    remote = build_index("fakegs://bucket/run", "fakegs://bucket/run/index", IndexConfig(index_type="ivf-sq8", seed=1))
    spread = build_index_distributed(
        "fakegs://bucket/run", "fakegs://bucket/spread", IndexConfig(index_type="ivf-sq8", seed=1)
    )
    assert remote["source"] == spread["source"] == "fakegs://bucket/run/embeddings"
    for name in ("index.faiss", "ids.parquet"):
        expected = (tmp_path / "local" / name).read_bytes()
        assert (tmp_path / "bucket" / "run" / "index" / name).read_bytes() == expected
        assert (tmp_path / "bucket" / "spread" / name).read_bytes() == expected
    assert remote["recall_at_10"] == spread["recall_at_10"] == local["recall_at_10"]
    assert sorted(p.name for p in (tmp_path / "bucket").iterdir()) == ["run", "spread"], "staging removed"
