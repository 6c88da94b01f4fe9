"""embedpipe writes only into its own folders and deletes only files it wrote (real Beam runs, real files)."""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import pathlib

import pytest
from embed_helpers import embeddings_by_id, manifest
from odd_images import encode, photo

import pipeline.job as job
from pipeline.cli import main
from pipeline.config import EmbedConfig, ModelConfig
from pipeline.ownership import MARKER_NAME, NotOwnedError, claim, is_embed_output, sweep_staging

COMMON = ["--weights", "random", "--image-size", "32", "--batch-size", "4"]


def tree(folder) -> dict[str, str]:
    """Every file under a folder -> sha256 of its bytes."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(pathlib.Path(folder).rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("safety_corpus")
    for name in ("astronaut", "chelsea"):
        (folder / f"{name}.png").write_bytes(encode(photo((40, 32), name), "PNG"))
    return folder


def users_folder(folder: pathlib.Path) -> pathlib.Path:
    """A folder of someone's own files, laid out like an embedpipe output (but not one)."""
    (folder / "embeddings").mkdir(parents=True)
    (folder / "errors").mkdir()
    (folder / "embeddings" / "mine.parquet").write_bytes(b"PAR1 the user's data PAR1")
    (folder / "errors" / "kept.parquet").write_bytes(b"PAR1 more of it PAR1")
    (folder / "manifest.json").write_text('{"shipment": 42}')
    (folder / "notes.txt").write_text("do not delete")
    return folder


def test_embed_refuses_a_non_empty_output_it_did_not_write(corpus, tmp_path, capsys):
    out = users_folder(tmp_path / "out")
    before = tree(out)
    assert main(["embed", "--input", str(corpus), "--output", str(out), *COMMON]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"embedpipe: error: --output {out} is not empty (embeddings, errors")
    assert "embedpipe did not write it; choose a new or empty --output, or pass --overwrite" in err[0]
    assert tree(out) == before  # not one byte touched, no marker added


def test_nightly_refuses_a_root_it_did_not_create(corpus, tmp_path, capsys):
    root = tmp_path / "root"
    (root / "photos").mkdir(parents=True)
    (root / "photos" / "a.jpg").write_bytes(b"holiday")
    assert main(["nightly", "--input", str(corpus), "--root", str(root), "--run-id", "r1", *COMMON]) == 2
    assert f"--root {root} is not empty (photos) and embedpipe did not write it" in capsys.readouterr().err
    assert sorted(os.listdir(root)) == ["photos"]  # no lock, no marker, no runs/


def test_markers_and_earlier_outputs_are_recognised(tmp_path):
    legacy = tmp_path / "legacy"  # an output of a version that wrote no marker: its manifest says it is one
    legacy.mkdir()
    (legacy / "manifest.json").write_text(json.dumps({"model": "resnet50-notop/...", "embedding_dim": 2048}))
    claim(str(legacy), kind="output", what="--output", recognised=is_embed_output)
    assert json.loads((legacy / MARKER_NAME).read_text())["kind"] == "output"
    # A nightly root is not an embed output, and the other way round.
    root = tmp_path / "root"
    claim(str(root), kind="root", what="--root")
    (root / "LATEST").write_text("r1\n")
    with pytest.raises(NotOwnedError, match=r"is a nightly run root, not an embed output; choose"):
        claim(str(root), kind="output", what="--output", accepts=("output", "run"), recognised=is_embed_output)
    with pytest.raises(NotOwnedError, match=r"is an embed output, not a nightly run root"):
        claim(str(legacy), kind="root", what="--root")
    with pytest.raises(NotOwnedError, match="is a file, not a folder"):
        claim(str(root / "LATEST"), kind="output", what="--output")


def stamp(hours_ago: float) -> str:
    t = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(hours=hours_ago)
    return t.strftime("%Y%m%dT%H%M%SZ")


def test_stale_staging_of_killed_runs_is_swept_and_nothing_else(tmp_path, caplog):
    out = tmp_path / "out"
    old = out / f"_staging-{stamp(30)}-0123456789ab"
    young = out / f"_staging-{stamp(2)}-0123456789ab"
    legacy = out / "_staging-abcdefabcdef"  # the name earlier versions gave: its age comes from its mtime
    users = out / "_staging-photos"  # starts alike, but embedpipe never makes such a name
    for folder in (old, young, legacy, users):
        (folder / "embeddings").mkdir(parents=True)
        (folder / "embeddings" / "part.parquet").write_bytes(b"x")
    two_days_ago = datetime.datetime.now().timestamp() - 48 * 3600
    os.utime(legacy, (two_days_ago, two_days_ago))
    os.utime(users, (two_days_ago, two_days_ago))
    with caplog.at_level(logging.WARNING):
        removed = sweep_staging(str(out))
    assert sorted(removed) == sorted([str(old), str(legacy)])
    assert sorted(os.listdir(out)) == sorted([young.name, users.name])
    assert f"removing {old}, left 30.0 h ago by a run that did not finish" in caplog.text


@pytest.mark.slow
def test_overwrite_replaces_only_what_embed_writes_and_sweeps_old_staging(corpus, tmp_path):
    out = users_folder(tmp_path / "out")
    stale = out / f"_staging-{stamp(25)}-00000000000a"
    (stale / "embeddings").mkdir(parents=True)
    (stale / "embeddings" / "part-0.parquet").write_bytes(b"left by a killed run")
    assert main(["embed", "--input", str(corpus), "--output", str(out), "--overwrite", *COMMON]) == 0
    assert (out / "notes.txt").read_text() == "do not delete"  # not a file embed writes: kept
    assert not stale.exists()
    assert sorted(os.listdir(out)) == [MARKER_NAME, "embeddings", "errors", "manifest.json", "notes.txt"]
    assert set(embeddings_by_id(out)) == {"astronaut.png", "chelsea.png"}  # the user's Parquet files replaced
    assert manifest(out)["counts"]["seen"] == 2
    assert json.loads((out / MARKER_NAME).read_text())["kind"] == "output"


def run_embed(corpus, out):
    cfg = EmbedConfig(input=str(corpus), output=str(out), model=ModelConfig(weights="random", image_size=32))
    return job.run_embed(cfg)


@pytest.mark.slow
def test_a_failed_run_removes_its_staging_a_counts_mismatch_keeps_it(corpus, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real_count = job.count_stamped

    def fails(*args):
        raise OSError("simulated: the disk went away")

    monkeypatch.setattr(job, "count_stamped", fails)  # after the pipeline wrote everything into staging
    with pytest.raises(OSError, match="simulated"):
        run_embed(corpus, out)
    assert sorted(os.listdir(out)) == [MARKER_NAME], "the failed run's staging folder is removed"

    real_counter = job.beam_counter
    monkeypatch.setattr(job, "count_stamped", real_count)
    monkeypatch.setattr(
        job, "beam_counter", lambda result, name: 3 if name == "images_seen" else real_counter(result, name)
    )
    with pytest.raises(job.CountsMismatchError, match=r"seen 3 != embedded 2 .* staged output left at .*_staging-"):
        run_embed(corpus, out)
    staged = [n for n in os.listdir(out) if n.startswith("_staging-")]
    assert len(staged) == 1 and os.listdir(out / staged[0] / "embeddings"), "kept for inspection"
    assert not (out / "manifest.json").exists()
