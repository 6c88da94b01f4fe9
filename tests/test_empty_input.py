"""An input path that holds no image is never a silent success: `embed` exits 2 saying what the
path held, and `nightly` refuses to publish (a mistyped path or a missing mount must not replace
yesterday's corpus with an empty one). Real Beam runs through the CLI's own `main`."""

from __future__ import annotations

import json
import pathlib

from test_nightly import COMMON, make_image

from pipeline.cli import main
from pipeline.nightly import read_latest


def test_embed_of_a_folder_without_images_exits_2_and_says_what_it_found(tmp_path, capsys):
    corpus = tmp_path / "data"
    corpus.mkdir()
    for i in range(3):  # TFRecord shards named as TFDS names them: no image extension, no .tfrecord suffix
        (corpus / f"train.tfrecord-{i:05d}-of-00003").write_bytes(b"\0" * 32)
    out = tmp_path / "out"

    rc = main(["embed", "--input", str(corpus), "--output", str(out), "--weights", "random", "--image-size", "32"])

    err = capsys.readouterr().err
    assert rc == 2
    assert "holds no image" in err and "3 files, none with an image extension" in err
    assert "did you mean --input-format tfrecord?" in err
    manifest = json.loads((out / "manifest.json").read_text())
    c = manifest["counts"]
    assert c["seen"] == c["failed"] == 1 and c["embedded"] == 0  # the empty path is one row: counted, not null
    assert manifest["failed_by_reason"] == {"empty_input": 1} and len(manifest["empty_inputs"]) == 1


def test_nightly_does_not_publish_a_night_whose_input_holds_nothing(tmp_path, capsys):
    corpus = tmp_path / "photos"
    corpus.mkdir()
    for i, name in enumerate(("astronaut", "coffee")):
        make_image(corpus / f"{name}.png", name, i)
    root = tmp_path / "root"
    assert main(["nightly", "--input", str(corpus), "--root", str(root), "--run-id", "r1", *COMMON]) == 0
    for path in corpus.iterdir():  # the mount is gone: the folder is there, its files are not
        path.unlink()

    rc = main(["nightly", "--input", str(corpus), "--root", str(root), "--run-id", "r2", *COMMON])

    assert rc == 3
    assert "NOT published" in capsys.readouterr().err
    assert read_latest(str(root)) == "r1"
    manifest = json.loads(pathlib.Path(root, "runs", "r2", "manifest.json").read_text())
    assert manifest["published"] is False and "holds no image" in manifest["validation_error"]
    assert "no files at all" in manifest["validation_error"]
