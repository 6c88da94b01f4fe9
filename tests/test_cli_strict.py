"""The command line is strict: an option neither embedpipe nor Beam knows is an error, never ignored."""

from __future__ import annotations

import logging

import pytest

from pipeline.cli import build_parser, main


@pytest.mark.parametrize(
    ("typo", "suggestion"),
    [(["--batchsize", "8"], "--batch-size"), (["--runer", "DataflowRunner"], "--runner"), (["--imagesize=64"], None)],
)
def test_a_typo_exits_2_naming_the_closest_option(tmp_path, capsys, typo, suggestion):
    rc = main(["embed", "--input", str(tmp_path), "--output", str(tmp_path / "out"), "--dry-run", *typo])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"unknown option {typo[0].split('=')[0]}" in err
    if suggestion:
        assert f"did you mean {suggestion}?" in err
    assert not (tmp_path / "out").exists()  # nothing ran


def test_beam_options_still_pass_and_dry_run_prints_nothing_false(tmp_path, capsys, caplog):
    argv = ["embed", "--input", str(tmp_path), "--output", str(tmp_path / "out"), "--dry-run"]
    beam = ["--runner", "DataflowRunner", "--project", "p", "--temp_location=gs://b/tmp", "--experiments", "x"]
    with caplog.at_level(logging.WARNING):
        assert main([*argv, *beam]) == 0
    out = capsys.readouterr()
    assert '"runner": "DataflowRunner"' in out.out and '"temp_location": "gs://b/tmp"' in out.out
    assert "Discarding" not in out.err + caplog.text  # Beam was handed argv, not a dict


def test_index_query_and_nightly_are_checked_too(tmp_path, capsys):
    assert main(["index", "--embeddings", str(tmp_path), "--output", str(tmp_path / "i"), "--metirc", "l2"]) == 2
    assert "did you mean --metric?" in capsys.readouterr().err
    nightly = ["nightly", "--input", str(tmp_path), "--root", str(tmp_path / "r"), "--dry-run", "--keeep", "3"]
    assert main(nightly) == 2
    assert "did you mean --keep?" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["before", "after"])
def test_verbose_works_before_or_after_the_subcommand(tmp_path, where):
    argv = ["embed", "--input", str(tmp_path), "--output", str(tmp_path / "o"), "--dry-run"]
    argv = ["-v", *argv] if where == "before" else [*argv, "-v"]
    args, beam_args = build_parser().parse_known_args(argv)
    assert args.verbose is True and beam_args == []
