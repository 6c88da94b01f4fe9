"""A weights file given by path: hashed once per run (in the driver), and no temporary copy left behind.

The fingerprint names the file by its sha256. The job resolves it once and hands the digest to
the workers; a file on a remote filesystem is copied to a local temporary file only while Keras
loads it. Both run through the real `embedpipe embed` on the local Beam runner.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import tempfile

import pytest
from index_fixtures import FakeRemoteFileSystem
from PIL import Image

from pipeline import config
from pipeline.cli import main
from pipeline.config import ModelConfig
from pipeline.index.build import build_index
from pipeline.index.search import Searcher
from pipeline.model import build_trunk


def _images(folder, n: int = 3) -> str:
    os.makedirs(folder)
    for i in range(n):
        Image.new("RGB", (40 + i, 36), (60 * i, 90, 200 - 40 * i)).save(os.path.join(folder, f"img{i}.jpg"))
    return str(folder)


def _weights(path, seed: int) -> str:
    """A .weights.h5 of the headless model at 32x32 (a seed no other test uses: a model this process never built)."""
    build_trunk(ModelConfig(weights="random", image_size=32, seed=seed)).save_weights(str(path))
    return str(path)


def _embed(corpus: str, out, weights: str) -> int:
    argv = ["embed", "--input", corpus, "--output", str(out), "--weights", weights, "--image-size", "32"]
    return main([*argv, "--batch-size", "4", "--thumbnails"])


@pytest.fixture
def hashed(monkeypatch) -> list[str]:
    """The paths config.file_sha256 is asked to hash, in order."""
    calls: list[str] = []
    real = config.file_sha256

    def counting(path: str) -> str:
        calls.append(path)
        return real(path)

    monkeypatch.setattr(config, "file_sha256", counting)
    return calls


def test_a_weights_file_is_hashed_once_per_run_and_once_by_the_query_model(tmp_path, hashed, capsys):
    weights = _weights(tmp_path / "trunk.weights.h5", seed=7101)
    digest = hashlib.sha256(pathlib.Path(weights).read_bytes()).hexdigest()
    corpus = _images(tmp_path / "images")
    assert _embed(corpus, tmp_path / "out", weights) == 0
    assert hashed == [weights], "the driver hashes the weights once; the workers, the manifest and the log reuse it"
    assert f"sha256:{digest[:16]}" in capsys.readouterr().out  # the summary's model line

    build_index(str(tmp_path / "out"), str(tmp_path / "index"))
    hashed.clear()
    with Searcher.open(str(tmp_path / "index")) as searcher:
        hits = searcher.search_images([os.path.join(corpus, "img1.jpg")], k=2)
        hits += searcher.search_images([os.path.join(corpus, "img2.jpg")], k=2)
    assert [h[0].id for h in hits] == ["img1.jpg", "img2.jpg"]
    assert hashed == [weights], "the query model checks the file once, then builds from the resolved config"


def test_a_remote_weights_file_leaves_no_temporary_copy(tmp_path, monkeypatch):
    bucket = tmp_path / "bucket"
    bucket.mkdir()
    monkeypatch.setattr(FakeRemoteFileSystem, "root", str(bucket))
    _weights(bucket / "trunk.weights.h5", seed=7102)
    corpus = _images(tmp_path / "images")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where mkstemp and gettempdir put things now
    copies: list[str] = []
    real_mkstemp = tempfile.mkstemp

    def spy(*args, **kwargs):
        fd, path = real_mkstemp(*args, **kwargs)
        if os.path.basename(path).startswith("embedpipe-weights-"):
            copies.append(path)
        return fd, path

    monkeypatch.setattr(tempfile, "mkstemp", spy)
    assert _embed(corpus, tmp_path / "out", "fakeremote://trunk.weights.h5") == 0
    assert len(copies) == 1, "one local copy, for the one model build"
    assert sorted(os.listdir(scratch)) == [], "the temporary folder is as it was before the run"
