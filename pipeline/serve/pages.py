"""The report and near-duplicate pages, served beside the results page when their files exist.

`/report` shows the newest nightly report of a run root (pipeline/report.py writes
ROOT/runs/<id>/report.html); `/duplicates` renders the groups that `embedpipe duplicates` wrote
to Parquet (pipeline/index/duplicates_page.py), cached until that file changes. Both pages are
self-contained (inline images, no script), served under a policy that lets them load nothing.
"""

from __future__ import annotations

import threading

from apache_beam.io.filesystems import FileSystems
from fastapi import FastAPI
from fastapi.responses import HTMLResponse

from pipeline.serve.errors import ApiError
from pipeline.storage import read_bounded

PAGE_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
MAX_PAGE_BYTES = 64 << 20


class _DuplicatesPage:
    """The rendered page of one groups file, rendered again only when the file changes."""

    def __init__(self, groups: str, index_dir: str) -> None:
        self.groups, self.index_dir = groups, index_dir
        self._lock = threading.Lock()
        self._stamp: tuple | None = None
        self._html = ""

    def html(self) -> str:
        from pipeline.index.duplicates_page import render_duplicates_page

        meta = FileSystems.match([self.groups])[0].metadata_list
        if not meta:
            raise FileNotFoundError(self.groups)
        stamp = (meta[0].size_in_bytes, meta[0].last_updated_in_seconds)
        with self._lock:
            if stamp != self._stamp:
                self._html, self._stamp = render_duplicates_page(self.groups, self.index_dir), stamp
            return self._html


def add_pages(app: FastAPI, *, index_dir: str, report_root: str | None, duplicates: str | None) -> None:
    """Register GET /report and GET /duplicates on `app` (404 JSON, saying how to make them, when absent)."""
    page = _DuplicatesPage(duplicates, index_dir) if duplicates else None

    @app.get("/report", response_class=HTMLResponse, include_in_schema=False)
    def report_page() -> HTMLResponse:
        from pipeline.report import latest_report_path

        path = latest_report_path(report_root or index_dir)
        if path is None:
            raise ApiError(
                404, "no_report", "no report.html here: `embedpipe report --root ROOT` writes one (serve --report-root)"
            )
        html = read_bounded(path, MAX_PAGE_BYTES).decode("utf-8", errors="replace")
        return HTMLResponse(html, headers={"Content-Security-Policy": PAGE_CSP})

    @app.get("/duplicates", response_class=HTMLResponse, include_in_schema=False)
    def duplicates_page() -> HTMLResponse:
        if page is None:
            raise ApiError(
                404, "no_duplicates", "start the server with --duplicates FILE (written by `embedpipe duplicates`)"
            )
        try:
            html = page.html()
        except (OSError, ValueError) as exc:
            raise ApiError(404, "no_duplicates", f"cannot read {duplicates}: {exc}") from exc
        return HTMLResponse(html, headers={"Content-Security-Policy": PAGE_CSP})
