"""`embedpipe query`, through its argument parser, on a photo index and a synthetic one."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys

import pytest
from index_fixtures import clustered, shared_photo_index, write_index_dir

from pipeline import reasons
from pipeline.cli import main
from pipeline.index.search import QueryImageError, Searcher


def _run(*argv: str) -> int:
    """`embedpipe query ...` in this process, through the real `embedpipe` entry point; its exit code."""
    return main(["query", *argv])


@pytest.fixture(scope="module")
def photos():
    return shared_photo_index(32)


def test_query_images_as_json_lines(photos, capsys):
    index_dir, files = photos
    queries = [files["chelsea.jpg"], files["brick.jpg"]]
    assert _run("--index", index_dir, "--image", *queries, "-k", "4", "--json") == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 8
    with Searcher.open(index_dir) as searcher:
        want = searcher.search_images(queries, k=4)
    for q, hits in zip(queries, want):
        got = [r for r in rows if r["query"] == q]
        assert [r["id"] for r in got] == [h.id for h in hits]
        assert [r["rank"] for r in got] == [1, 2, 3, 4]
        assert all(r["query_type"] == "image" for r in got)
        assert [r["score"] for r in got] == pytest.approx([h.score for h in hits], abs=1e-5)
        assert set(got[0]) == {"query", "query_type", "id", "uri", "score", "rank", "label"}
    assert rows[0]["id"] == "chelsea.jpg" and rows[4]["id"] == "brick.jpg"


def test_query_ids_as_a_table(photos, capsys):
    index_dir, _ = photos
    assert _run("--index", index_dir, "--id", "coffee.jpg", "rocket.jpg", "-k", "3") == 0
    out = capsys.readouterr().out
    blocks = [b for b in out.split("\n\n") if b.strip()]
    assert len(blocks) == 2
    with Searcher.open(index_dir) as searcher:
        want = searcher.search_ids(["coffee.jpg", "rocket.jpg"], k=3)
    for block, query, hits in zip(blocks, ["coffee.jpg", "rocket.jpg"], want):
        lines = block.splitlines()
        assert lines[0] == f"query {query}"
        assert lines[1].split() == ["rank", "cosine", "id", "uri"]
        rows = [line.split() for line in lines[2:]]
        assert [r[0] for r in rows] == ["1", "2", "3"]
        assert [r[2] for r in rows] == [h.id for h in hits]
        assert [float(r[1]) for r in rows] == pytest.approx([h.score for h in hits], abs=1e-4)
        assert rows[0][2] == query and rows[0][3].startswith("file://")


def test_l2_index_table_says_distance(tmp_path, capsys):
    d = write_index_dir(tmp_path, clustered(20, 8), metric="l2")
    assert _run("--index", d, "--id", "item-00003", "-k", "2") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[:3] == ["rank", "l2", "dist"]
    assert lines[2].split()[:3] == ["1", "0.0000", "item-00003"]


def test_query_errors_exit_2_with_one_clear_line(photos, tmp_path, capsys):
    index_dir, files = photos
    cases = [
        (["--index", str(tmp_path / "absent"), "--id", "x"], "no index directory"),
        (["--index", index_dir, "--id", "coffee.jpg", "nope.jpg"], "id 'nope.jpg' is not in the index"),
        (["--index", index_dir, "--image", str(tmp_path / "missing.jpg")], "cannot read it"),
        (["--index", index_dir, "--id", "coffee.jpg", "-k", "0"], "-k must be >= 1"),
        (["--index", index_dir, "--image", files["camera.jpg"], "--max-pixels", "10"], "exceeds the limit of 10"),
    ]
    (tmp_path / "text.jpg").write_text("not an image")
    cases.append((["--index", index_dir, "--image", str(tmp_path / "text.jpg")], "not a recognised image format"))
    synthetic = write_index_dir(tmp_path / "synthetic", clustered(10, 8))
    cases.append((["--index", synthetic, "--image", files["camera.jpg"]], "records no model_config"))
    for argv, message in cases:
        assert _run(*argv) == 2, argv
        captured = capsys.readouterr()
        assert captured.out == ""
        assert captured.err.startswith("embedpipe query: error: ") and message in captured.err, captured.err
        assert captured.err.count("\n") == 1


def test_query_needs_exactly_one_kind_of_query(photos, capsys):
    index_dir, files = photos
    with pytest.raises(SystemExit) as info:
        _run("--index", index_dir, "--id", "coffee.jpg", "--image", files["coffee.jpg"])
    assert info.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _run("--index", index_dir)


def test_query_image_over_max_bytes_is_too_large(photos, capsys):
    index_dir, files = photos
    size = os.path.getsize(files["camera.jpg"])
    assert _run("--index", index_dir, "--image", files["camera.jpg"], "--max-bytes", str(size - 1)) == 2
    err = capsys.readouterr().err
    assert err.startswith("embedpipe query: error: query image ") and err.count("\n") == 1
    assert f"more than {size - 1:,} bytes" in err and "--max-bytes" in err
    assert _run("--index", index_dir, "--image", files["camera.jpg"], "--max-bytes", str(size), "-k", "1") == 0
    assert capsys.readouterr().out.splitlines()[2].split()[2] == "camera.jpg"
    with Searcher.open(index_dir) as searcher:
        searcher.query_model.max_bytes = 10
        with pytest.raises(QueryImageError) as info:
            searcher.search_images([files["camera.jpg"]])
    assert info.value.reason == reasons.TOO_LARGE


def _limited_memory() -> None:
    # A safety net: a query that reads without end fails here instead of taking the machine's memory.
    resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))


def test_query_images_that_never_end_are_refused_promptly(photos, tmp_path):
    """/dev/zero would be read forever and a FIFO without a writer would block forever."""
    index_dir, _ = photos
    fifo = tmp_path / "query.jpg"
    os.mkfifo(fifo)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}
    runs = {
        path: subprocess.Popen(
            [sys.executable, "-m", "pipeline", "query", "--index", index_dir, "--image", path],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            preexec_fn=_limited_memory,
        )
        for path in ("/dev/zero", str(fifo))
    }
    try:
        for path, run in runs.items():
            _, err = run.communicate(timeout=120)
            assert run.returncode == 2, err[-2000:]
            line = err.strip().splitlines()[-1]
            assert line.startswith(f"embedpipe query: error: query image {path}: cannot read it"), err[-2000:]
            assert "not a regular file" in line
    finally:
        for run in runs.values():
            run.kill()
            run.communicate()
