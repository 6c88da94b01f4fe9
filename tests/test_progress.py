"""Progress of a real local run: one bar (on a terminal) or INFO lines (otherwise) with the true total."""

from __future__ import annotations

import io
import logging
import re
import sys

import pytest

from pipeline.config import EmbedConfig, ModelConfig
from pipeline.job import run_embed
from pipeline.progress import describe, read_channel
from pipeline.sample import make_corpus


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    make_corpus(folder, count=6)  # 6 photos and 3 broken files
    return folder


def _run(corpus, out) -> dict:
    model = ModelConfig(image_size=32, weights="random")
    return run_embed(EmbedConfig(input=str(corpus), output=str(out), model=model, batch_size=4, progress_seconds=1))


def test_a_terminal_gets_one_bar_whose_last_state_is_the_true_total(corpus, tmp_path, monkeypatch):
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    manifest = _run(corpus, tmp_path / "out")
    screen = terminal.getvalue()
    assert manifest["counts"]["seen"] == 9
    frames = re.findall(r"(\d+)/(\d+)", screen)
    assert frames, screen[-2000:]
    assert frames[-1] == ("9", "9")  # done / total of the last frame drawn
    assert "embedding" in screen and "img/s" in screen


def test_without_a_terminal_progress_is_info_lines_ending_at_the_total(corpus, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="embedpipe"):
        manifest = _run(corpus, tmp_path / "out")
    lines = [r.getMessage() for r in caplog.records if "embedpipe progress" in r.getMessage()]
    assert lines and lines[-1].startswith(f"embedpipe progress: 9 / {manifest['counts']['seen']} images (100.0%)")
    assert all(r.levelno == logging.INFO for r in caplog.records if "progress" in r.getMessage())


def test_counts_from_several_worker_files_add_up(tmp_path):
    (tmp_path / "1-a.json").write_text('{"listed": 10, "seen": 4, "done": 3}')
    (tmp_path / "2-b.json").write_text('{"listed": 0, "seen": 5, "done": 5}')
    (tmp_path / "3-c.json.tmp").write_text("{half a file")  # a write in progress is not read
    counts = read_channel(str(tmp_path))
    assert counts == {"listed": 10, "seen": 9, "done": 8}
    assert describe(counts, 4.0) == "8 / 10 images (80.0%), 2.0 img/s, ETA 0m01s"
    assert describe({"listed": 0, "seen": 0, "done": 7}, 1.0) == "7 images done, 7.0 img/s"
