"""/report and /duplicates over a real socket: served when their files exist, a JSON 404 saying how to make them."""

from __future__ import annotations

import json

import httpx
import numpy as np
from index_fixtures import clustered, serve_in_thread, swatch_jpeg, write_index_dir

from pipeline.cli import main
from pipeline.index.search import Searcher
from pipeline.serve.app import create_app


def _index_with_copies(tmp_path) -> str:
    base = clustered(30, 16, seed=2)
    vectors = np.concatenate([base, base[:3] + 1e-4])  # three planted near-copies
    ids = [f"img-{i:02d}" for i in range(len(vectors))]
    thumbs = [swatch_jpeg(i % 30) for i in range(len(vectors))]
    return str(write_index_dir(tmp_path / "index", vectors, ids=ids, thumbnails=thumbs))


def test_report_and_duplicates_pages(tmp_path):
    index = _index_with_copies(tmp_path)
    root = tmp_path / "root"
    (root / "runs" / "r1").mkdir(parents=True)
    (root / "LATEST").write_text("r1\n")
    (root / "runs" / "r1" / "manifest.json").write_text(json.dumps({"run_id": "r1", "published": True}))
    (root / "runs" / "r1" / "report.html").write_text("<!doctype html><title>night r1</title><h1>r1</h1>")
    groups = tmp_path / "groups.parquet"
    assert main(["duplicates", "--index", index, "--threshold", "0.999", "--output", str(groups)]) == 0

    with Searcher.open(index) as searcher:
        app = create_app(searcher, report_root=str(root), duplicates=str(groups))
        with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=60) as client:
            report = client.get("/report")
            assert report.status_code == 200 and "night r1" in report.text
            assert report.headers["content-security-policy"].startswith("default-src 'none'")
            page = client.get("/duplicates")
            assert page.status_code == 200 and page.text.lstrip().lower().startswith("<!doctype html")
            assert all(f"img-{i:02d}" in page.text for i in (0, 1, 2, 30, 31, 32))  # the planted pairs are shown

    with Searcher.open(index) as searcher, serve_in_thread(create_app(searcher)) as url:
        for path, code in (("/report", "no_report"), ("/duplicates", "no_duplicates")):
            missing = httpx.get(url + path, timeout=60)
            assert missing.status_code == 404 and missing.json()["error"] == code
