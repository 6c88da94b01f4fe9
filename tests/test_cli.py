"""The `embedpipe` command as a user runs it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from pipeline.cli import build_parser, main

EMBED_OPTIONS = [
    "--input", "--output", "--image-size", "--pooling", "--weights", "--seed", "--resize", "--precision",
    "--batch-size", "--workers", "--max-pixels", "--thumbnails", "--require-gpu",
]  # fmt: skip


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as done:
        main(["embed", "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for option in EMBED_OPTIONS:
        assert option in text, option
    assert "passed to Beam unchanged" in text
    assert "squash (default)" in text
    with pytest.raises(SystemExit):
        main(["--help"])
    top = capsys.readouterr().out
    for command in ("embed", "demo"):
        assert command in top


def test_unknown_args_go_to_beam():
    args, beam_args = build_parser().parse_known_args(
        ["embed", "--input", "a", "--output", "b", "--runner", "DataflowRunner", "--temp_location=gs://x/tmp"]
    )
    assert args.input == "a" and beam_args == ["--runner", "DataflowRunner", "--temp_location=gs://x/tmp"]


def test_bad_option_values_are_clear_errors(capsys, tmp_path):
    code = main(["embed", "--input", str(tmp_path), "--output", str(tmp_path / "o"), "--image-size", "16"])
    assert code == 2
    assert "image_size must be >= 32" in capsys.readouterr().err


def test_unexpected_errors_are_one_line_and_v_shows_the_traceback(tmp_path, capsys):
    from index_fixtures import write_embeddings

    data = write_embeddings(str(tmp_path / "data"), np.eye(40, 8, dtype=np.float32) + 1, model="m")
    (tmp_path / "file").write_text("a file, where the index folder's parent should be")
    argv = ["index", "--embeddings", data, "--output", str(tmp_path / "file" / "ix"), "--index-type", "flat"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    # OSError or its NotADirectoryError, as the filesystem layer raises it: the type named, on one line
    assert re.match(r"embedpipe: error: (OSError|NotADirectoryError): ", err[0]) and "Not a directory" in err[0]
    assert err[0].endswith(" (run with -v for the traceback)")
    assert main([*argv, "-v"]) == 1  # -v after the subcommand, where people add it
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err
    assert re.search(r"embedpipe: error: (OSError|NotADirectoryError): ", err)


def test_index_type_is_index_type_and_the_old_index_spelling_still_works_with_one_warning(tmp_path, caplog):
    from index_fixtures import write_embeddings

    data = write_embeddings(str(tmp_path / "data"), np.eye(40, 8, dtype=np.float32) + 1, model="m")
    argv = ["index", "--embeddings", data, "--memory-budget", "1MB", "--seed", "2"]
    assert main([*argv, "--output", str(tmp_path / "new"), "--index-type", "hnsw"]) == 0
    assert not [r for r in caplog.records if "deprecated" in r.getMessage()]
    assert main([*argv, "--output", str(tmp_path / "old"), "--index", "flat", "--index", "hnsw"]) == 0
    warnings = [r.getMessage() for r in caplog.records if "deprecated" in r.getMessage()]
    assert warnings == ["--index is deprecated and will be removed in the next release; use --index-type"]
    for name in ("new", "old"):
        assert json.loads((tmp_path / name / "index.json").read_text())["index_type"] == "hnsw"
    index_help = build_parser().commands["index"].format_help()
    assert "--index-type TYPE" in index_help and "deprecated spelling of --index-type" in index_help


def test_every_error_class_carries_its_exit_code_and_keeps_its_builtin_base():
    from pipeline.decode import GpuDecodeUnavailableError
    from pipeline.errors import EmbedpipeError, UsageError, WeightsUnavailableError
    from pipeline.index.loading import IndexFormatError
    from pipeline.index.query_model import ModelMismatchError, QueryImageError
    from pipeline.index.search import UnknownIdError
    from pipeline.job import CountsMismatchError
    from pipeline.lock import LockHeldError, LockLostError
    from pipeline.nightly import RunIdError, ValidationError
    from pipeline.ownership import NotOwnedError

    expected = {
        UsageError: (2, ValueError), NotOwnedError: (2, ValueError), RunIdError: (2, ValueError),
        GpuDecodeUnavailableError: (2, ValueError), IndexFormatError: (2, ValueError),
        QueryImageError: (2, ValueError), ModelMismatchError: (2, ValueError), UnknownIdError: (2, KeyError),
        WeightsUnavailableError: (2, RuntimeError), CountsMismatchError: (1, RuntimeError),
        ValidationError: (3, RuntimeError), LockLostError: (3, RuntimeError), LockHeldError: (4, RuntimeError),
    }  # fmt: skip
    for cls, (code, base) in expected.items():
        assert issubclass(cls, EmbedpipeError) and issubclass(cls, base), cls
        assert cls.exit_code == code, cls


def test_subcommands_raise_and_main_alone_prints_the_line_and_returns_the_code(tmp_path, capsys):
    from pipeline.errors import UsageError

    argv = ["query", "--index", str(tmp_path), "--id", "x", "-k", "0"]
    args, rest = build_parser().parse_known_args(argv)
    with pytest.raises(UsageError, match="-k must be >= 1"):
        args.func(args, rest)
    assert capsys.readouterr().err == ""
    assert main(argv) == 2
    assert capsys.readouterr().err == "embedpipe query: error: -k must be >= 1; got 0\n"


def test_one_line_takes_the_innermost_error_of_a_nested_traceback():
    from pipeline.cli import _one_line

    nested = RuntimeError(
        'Pipeline failed: Traceback (most recent call last):\n  File "x.py", line 1, in f\n'
        "ValueError: bad pixel [while running 'EmbedImages']\n"
    )
    assert _one_line(nested) == "RuntimeError: ValueError: bad pixel [while running 'EmbedImages']"
    assert _one_line(KeyError()) == "KeyError"


def _env(tmp_path) -> dict:
    env = dict(os.environ)
    env.update(KERAS_HOME=str(tmp_path / "keras"), HTTPS_PROXY="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9")
    return env


@pytest.mark.slow
def test_embed_with_unreachable_imagenet_fails_clearly(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "x.png").write_bytes(b"")
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "embed", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        env=_env(tmp_path),
        timeout=300,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert "could not load the ImageNet weights" in done.stderr
    assert "--weights random" in done.stderr
    assert not (tmp_path / "o" / "manifest.json").exists()


@pytest.mark.slow
def test_demo_falls_back_to_random_weights_loudly(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            "demo",
            "--output",
            str(tmp_path / "demo"),
            "--count",
            "5",
            "--image-size",
            "32",
        ],
        capture_output=True,
        text=True,
        env=_env(tmp_path),
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "DEMO ONLY" in done.stderr and "RANDOM weights" in done.stderr
    assert "embedded  5" in done.stdout and "failed    3" in done.stdout
    with open(tmp_path / "demo" / "out" / "manifest.json") as f:
        manifest = json.load(f)
    assert "random-seed:0" in manifest["model"]
    assert manifest["counts"] == {"seen": 8, "embedded": 5, "reused": 0, "failed": 3}
