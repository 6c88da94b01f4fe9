"""`embedpipe nightly`: incremental runs, atomic publish, crash safety (real Beam, real FAISS)."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import subprocess
import sys

import faiss
import numpy as np
import pyarrow.parquet as pq
import pytest
from embed_helpers import embeddings_by_id, read_dir
from odd_images import encode, photo

from pipeline.cli import main
from pipeline.nightly import read_latest

pytestmark = pytest.mark.slow

COMMON = ["--weights", "random", "--image-size", "32", "--batch-size", "4", "--index-type", "flat"]


def nightly(corpus, root, run_id, *extra) -> int:
    return main(["nightly", "--input", str(corpus), "--root", str(root), "--run-id", run_id, *COMMON, *extra])


def nightly_subprocess(corpus, root, run_id, *extra, prelude: str = "") -> subprocess.CompletedProcess:
    """The CLI in a fresh interpreter, after `prelude` (used to plant a crash)."""
    args = ["nightly", "--input", str(corpus), "--root", str(root), "--run-id", run_id, *COMMON, *extra]
    code = (
        "import sys\n"
        f"{prelude}\n"
        "from pipeline.cli import main\n"
        f"rc = main({args!r})\n"
        "print('TF_IMPORTED', 'tensorflow' in sys.modules)\n"
        "sys.exit(rc)\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)


def run_manifest(root, run_id) -> dict:
    return json.loads((pathlib.Path(root) / "runs" / run_id / "manifest.json").read_text())


def tree_digest(folder) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(pathlib.Path(folder).rglob("*"))
        if p.is_file()
    }


def make_image(path: pathlib.Path, name: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    img = np.asarray(photo((48, 40), name)).astype(np.int16) + rng.integers(-30, 30, (40, 48, 3))
    path.write_bytes(encode(__import__("PIL.Image").Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)), "PNG"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("nightly_corpus")
    for i, name in enumerate(["astronaut", "chelsea", "coffee", "rocket", "camera", "brick", "grass", "gravel"]):
        make_image(folder / f"{name}.png", name, i)
        # Files of a nightly corpus are old; fresh ones (modified in the last seconds) get no change
        # marker, which would make whether r2 reads them depend on how fast r1 started.
        os.utime(folder / f"{name}.png", (1_700_000_000 + i, 1_700_000_000 + i))
    return folder


@pytest.fixture(scope="module")
def two_runs(corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("root")
    assert nightly(corpus, root, "r1") == 0
    second = nightly_subprocess(corpus, root, "r2")
    assert second.returncode == 0, second.stderr[-3000:]
    return root, second


def test_first_run_embeds_everything_and_publishes(two_runs):
    root, _ = two_runs
    m = run_manifest(root, "r1")
    assert m["counts"] == {"seen": 8, "embedded": 8, "reused": 0, "reused_by_marker": 0, "failed": 0, "deleted": 0}
    assert m["validated"] is True and m["mode"] == "full" and m["index"]["ntotal"] == 8


def test_unchanged_rerun_reuses_everything_without_tensorflow(two_runs):
    root, second = two_runs
    assert read_latest(str(root)) == "r2"
    m = run_manifest(root, "r2")
    # Unchanged size and mtime: not one file is read again (tests/test_markers.py proves it).
    assert m["counts"] == {"seen": 8, "embedded": 0, "reused": 8, "reused_by_marker": 8, "failed": 0, "deleted": 0}
    assert m["mode"] == "incremental" and m["previous_run"] == "r1"
    assert "TF_IMPORTED False" in second.stdout  # nothing to embed: no model, no TensorFlow
    first, again = read_dir(root / "runs/r1/embeddings"), read_dir(root / "runs/r2/embeddings")
    key = [("id", "ascending")]
    assert first.sort_by(key).equals(again.sort_by(key))  # same vectors, hashes, timestamps, markers


def test_changes_are_embedded_deletions_dropped_and_the_index_answers(two_runs, corpus, tmp_path):
    root, _ = two_runs
    changed = tmp_path / "corpus3"
    changed.mkdir()
    for p in corpus.iterdir():
        (changed / p.name).write_bytes(p.read_bytes())
    (changed / "gravel.png").unlink()  # deleted
    make_image(changed / "coffee.png", "coffee", 99)  # changed content, same id
    make_image(changed / "new_one.png", "astronaut", 100)  # new
    make_image(changed / "new_two.png", "rocket", 101)  # new
    assert nightly(changed, root, "r3") == 0
    m = run_manifest(root, "r3")
    # The copies have new mtimes: every file is read, the 6 unchanged ones are reused by sha256.
    assert m["counts"] == {"seen": 9, "embedded": 3, "reused": 6, "reused_by_marker": 0, "failed": 0, "deleted": 1}
    assert read_latest(str(root)) == "r3"
    vectors = embeddings_by_id(root / "runs/r3")
    old = embeddings_by_id(root / "runs/r2")
    assert set(vectors) == set(old) - {"gravel.png"} | {"new_one.png", "new_two.png"}
    assert not np.array_equal(vectors["coffee.png"], old["coffee.png"])
    for key in ("astronaut.png", "chelsea.png"):
        assert np.array_equal(vectors[key], old[key])
    # The published index holds the new images and finds each of them first.
    index = faiss.read_index(str(root / "runs/r3/index/index.faiss"))
    ids = pq.read_table(root / "runs/r3/index/ids.parquet").column("id").to_pylist()
    assert index.ntotal == 9
    for key in ("new_one.png", "new_two.png", "coffee.png"):
        q = vectors[key][None, :].astype("float32")
        faiss.normalize_L2(q)
        _, labels = index.search(q, 1)
        assert ids[labels[0][0]] == key


def test_model_change_reembeds_everything(two_runs, corpus):
    root, _ = two_runs
    latest = read_latest(str(root))
    # Folders under runs/ that are not embedpipe runs: someone's notes, a copy of a run (its manifest names r1).
    (root / "runs/notes").mkdir()
    (root / "runs/notes/todo.txt").write_text("mine")
    (root / "runs/copy-of-r1").mkdir()
    (root / "runs/copy-of-r1/manifest.json").write_bytes((root / "runs/r1/manifest.json").read_bytes())
    assert nightly(corpus, root, "r4-max", "--pooling", "max", "--keep", "3") == 0
    m = run_manifest(root, "r4-max")
    assert m["mode"] == "full" and m["counts"]["reused"] == 0 and m["counts"]["embedded"] == 8
    assert m["previous_run"] == latest
    # --keep 3 pruned the oldest runs only after publishing, and only embedpipe's own runs.
    assert sorted(os.listdir(root / "runs")) == ["copy-of-r1", "notes", "r2", "r3", "r4-max"]
    assert (root / "runs/notes/todo.txt").read_text() == "mine"


def test_nightly_takes_the_index_group_of_embedpipe_index(corpus, tmp_path, caplog):
    root = tmp_path / "root"
    extra = ["--index", "hnsw", "--index-seed", "5", "--recall-target", "0.5", "--memory-budget", "1GB"]
    assert nightly(corpus, root, "r1", *extra) == 0  # --index: the deprecated spelling of --index-type
    meta = json.loads((root / "runs/r1/index/index.json").read_text())
    assert (meta["index_type"], meta["recall_target"]) == ("hnsw", 0.5)
    warnings = [r.getMessage() for r in caplog.records if "deprecated" in r.getMessage()]
    assert warnings == ["--index is deprecated and will be removed in the next release; use --index-type"]


def test_failed_validation_does_not_publish(corpus, tmp_path):
    root = tmp_path / "root"
    assert nightly(corpus, root, "r1-good") == 0
    assert nightly(corpus, root, "r2-bad", "--recall-floor", "1.01") == 3
    assert read_latest(str(root)) == "r1-good"
    assert run_manifest(root, "r2-bad")["validated"] is False


KILL_IN_EMBED = """
import os, signal
import pipeline.embed as e
_orig = e._EmbedFn._account
def _account(self, result):
    out = _orig(self, result)
    os.kill(os.getpid(), signal.SIGKILL)  # dies after the first embedded batch
e._EmbedFn._account = _account
"""

KILL_IN_INDEX = """
import os, signal
import faiss
faiss.write_index = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)  # dies writing the index
"""


@pytest.mark.parametrize("where", [KILL_IN_EMBED, KILL_IN_INDEX], ids=["mid-embed", "mid-index"])
def test_killed_run_leaves_latest_and_earlier_runs_intact(corpus, tmp_path, where):
    root = tmp_path / "root"
    assert nightly(corpus, root, "base") == 0
    before = tree_digest(root / "runs/base")
    killed = nightly_subprocess(corpus, root, "killed", "--full", prelude=where)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert read_latest(str(root)) == "base"
    assert tree_digest(root / "runs/base") == before
    assert not (root / "runs/killed/index/index.json").exists()
    # The next night succeeds, even reusing the killed run's id.
    assert nightly(corpus, root, "killed") == 0
    assert read_latest(str(root)) == "killed"
    assert run_manifest(root, "killed")["counts"]["reused"] == 8
