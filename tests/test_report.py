"""The nightly report: real `embedpipe nightly` runs (Beam, Parquet, FAISS), the page they leave
beside each run, its drift check against a planted moved vector, and the page in headless Chromium."""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import pathlib
import shutil
from html.parser import HTMLParser

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from test_nightly import make_image

from pipeline.cli import main
from pipeline.config import IndexConfig
from pipeline.nightly import read_latest
from pipeline.records import embeddings_schema
from pipeline.report import build_report, latest_report_path

COMMON = ["--weights", "random", "--image-size", "32", "--batch-size", "4", "--index", "flat", "--thumbnails"]
VOID = {"meta", "img", "br", "hr", "input", "link", "col", "source", "wbr", "area", "base", "embed", "track"}


class Page(HTMLParser):
    """A parsed page: every element (tag, attributes, text inside), checked to nest properly."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[dict] = []
        self._open: list[dict] = []
        self.doctype = None
        self.feed(text)
        self.close()
        assert not self._open, f"unclosed elements: {[e['tag'] for e in self._open]}"

    def handle_decl(self, decl: str) -> None:
        self.doctype = decl

    def handle_starttag(self, tag: str, attrs) -> None:
        element = {"tag": tag, "attrs": dict(attrs), "text": "", "parent": self._open[-1] if self._open else None}
        self.elements.append(element)
        if tag not in VOID:
            self._open.append(element)

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID:
            return
        assert self._open and self._open[-1]["tag"] == tag, f"</{tag}> closes <{self._open[-1]['tag']}>"
        self._open.pop()

    def handle_data(self, data: str) -> None:
        for element in self._open:
            element["text"] += data

    def find(self, tag: str | None = None, **attrs) -> list[dict]:
        """Elements with this tag (any when None) whose attributes include `attrs` (underscores: dashes)."""
        want = {k.replace("_", "-"): v for k, v in attrs.items()}
        return [
            e
            for e in self.elements
            if (tag is None or e["tag"] == tag) and all(e["attrs"].get(k) == v for k, v in want.items())
        ]

    def inside(self, element: dict, tag: str, **attrs) -> list[dict]:
        """Descendants of `element` matching tag and attrs."""

        def under(e: dict) -> bool:
            while e["parent"] is not None:
                if e["parent"] is element:
                    return True
                e = e["parent"]
            return False

        return [e for e in self.find(tag, **attrs) if under(e)]


def fields_of(page: Page, row: dict) -> dict[str, str | None]:
    """data-field -> data-value of a table row's cells."""
    return {
        c["attrs"]["data-field"]: c["attrs"].get("data-value")
        for c in page.inside(row, "td")
        if "data-field" in c["attrs"]
    }


def check_self_contained(page: Page) -> list[bytes]:
    """The structure every embedpipe page has, nothing loaded from elsewhere; returns the inline images."""
    assert page.doctype and page.doctype.lower() == "doctype html"
    assert [e["tag"] for e in page.elements[:2]] == ["html", "head"]
    assert page.find("title") and page.find("body") and page.find("main")
    assert not page.find("script") and not page.find("link") and not page.find("iframe")
    for e in page.elements:
        for name in ("src", "href"):
            value = e["attrs"].get(name)
            assert value is None or value.startswith(("data:", "#")), f"<{e['tag']} {name}={value[:60]!r}>"
    images = []
    for img in page.find("img"):
        header, payload = img["attrs"]["src"].split(",", 1)
        assert header in ("data:image/png;base64", "data:image/jpeg;base64"), header
        data = base64.b64decode(payload, validate=True)
        Image.open(io.BytesIO(data)).verify()  # a real image, not just a header
        images.append(data)
    return images


def nightly(corpus, root, run_id, *extra) -> int:
    return main(["nightly", "--input", str(corpus), "--root", str(root), "--run-id", run_id, *COMMON, *extra])


def manifest_of(root, run_id) -> dict:
    return json.loads((pathlib.Path(root) / "runs" / run_id / "manifest.json").read_text())


@pytest.fixture(scope="module")
def nightly_root(tmp_path_factory):
    """Two real nights: the second with a changed, a deleted, a new and a now-broken image."""
    base = tmp_path_factory.mktemp("report")
    corpus = base / "corpus"
    corpus.mkdir()
    for i, name in enumerate(["astronaut", "chelsea", "coffee", "rocket", "camera", "brick"]):
        make_image(corpus / f"{name}.png", name, i)
        os.utime(corpus / f"{name}.png", (1_700_000_000 + i, 1_700_000_000 + i))
    (corpus / "empty.jpg").write_bytes(b"")
    (corpus / "notes.png").write_text("not an image\n")
    root = base / "root"
    assert nightly(corpus, root, "r1") == 0
    make_image(corpus / "coffee.png", "coffee", 99)  # changed bytes: re-embedded
    (corpus / "brick.png").unlink()  # deleted
    make_image(corpus / "new.png", "grass", 7)  # new
    (corpus / "chelsea.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"cut short" * 8)  # was fine in r1, broken now
    assert nightly(corpus, root, "r2") == 0
    return root


@pytest.mark.slow
def test_each_published_night_has_a_report_whose_counts_are_the_manifests(nightly_root):
    for run_id, runs_shown in (("r1", ["r1"]), ("r2", ["r1", "r2"])):
        page = Page((nightly_root / "runs" / run_id / "report.html").read_text())
        images = check_self_contained(page)
        plots = [e["attrs"]["data-plot"] for e in page.find("img") if "data-plot" in e["attrs"]]
        assert len(images) >= 4 and {"counts", "failures", "timing"} <= set(plots), plots
        assert [s["attrs"]["id"] for s in page.find("section") if "id" in s["attrs"]] == [
            "nights", "drift", "index", "failures",
        ]  # fmt: skip
        table = page.find("table", id="nights-table")[0]
        rows = page.inside(table, "tr", data_status="published")
        assert [r["attrs"]["data-run"] for r in rows] == runs_shown
        for row in rows:
            counts = manifest_of(nightly_root, row["attrs"]["data-run"])["counts"]
            shown = fields_of(page, row)
            for field in ("seen", "embedded", "reused", "reused_by_marker", "failed", "deleted"):
                assert shown[field] == str(counts[field]), (row["attrs"]["data-run"], field)
    # r2 against r1: 3 images kept their bytes (astronaut, rocket, camera) and, reused, their vectors.
    page = Page((nightly_root / "runs/r2/report.html").read_text())
    assert page.find("div", id="summary")[0]["attrs"]["data-drift"] == "ok"
    (check,) = page.find("tr", data_run="r2", data_previous="r1")
    fields = fields_of(page, check)
    assert check["attrs"]["data-status"] == "ok" and fields["unchanged"] == "3" and fields["checked"] == "3"
    assert float(fields["max_relative_l2"]) == 0.0
    nn = page.find("p", id="nn-changed")[0]["attrs"]
    assert nn["data-compared"] == "4"  # sampled images also in r1: all but new.png (chelsea failed, brick left)
    assert {"nn-distance"} <= {e["attrs"].get("data-plot") for e in page.find("img")}
    # The worst failures: chelsea.png embedded fine in r1, so it comes first, with r1's thumbnail.
    cards = page.find("figure", **{"class": "failure"})
    assert cards[0]["attrs"]["data-id"] == "chelsea.png"
    assert {c["attrs"]["data-reason"] for c in cards} == {"truncated_image", "not_an_image", "empty_file"}
    assert page.inside(cards[0], "img")[0]["attrs"]["src"].startswith("data:image/jpeg;base64,")
    assert "embedded fine in the previous run" in cards[0]["text"]
    assert "Exact index" in page.find("section", id="index")[0]["text"]


def _copy_run(root: pathlib.Path, src: str, dst: str, moved: dict[str, float]) -> None:
    """A run written by hand: `src` copied as `dst`, with the listed vectors scaled (same bytes, same sha)."""
    shutil.copytree(root / "runs" / src, root / "runs" / dst)
    (root / "runs" / dst / "report.html").unlink()
    for path in sorted((root / "runs" / dst / "embeddings").glob("*.parquet")):
        table = pq.read_table(path)
        assert table.schema.equals(embeddings_schema(2048, thumbnails=True), check_metadata=False)
        ids = table.column("id").to_pylist()
        vectors = table.column("embedding").combine_chunks().flatten().to_numpy().reshape(len(ids), -1).copy()
        for name, factor in moved.items():
            if name in ids:
                vectors[ids.index(name)] *= np.float32(factor)
        column = pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel(), pa.float32()), vectors.shape[1])
        table = table.set_column(table.schema.get_field_index("embedding"), table.schema.field("embedding"), column)
        pq.write_table(table, path)
    manifest = manifest_of(root, src)
    manifest.update(run_id=dst, previous_run=src)
    (root / "runs" / dst / "manifest.json").write_text(json.dumps(manifest))
    (root / "LATEST").write_text(dst + "\n")


@pytest.mark.slow
def test_drift_check_flags_a_planted_moved_vector_of_unchanged_bytes(nightly_root, tmp_path, capsys):
    root = tmp_path / "root"
    shutil.copytree(nightly_root, root)
    # 2% longer: 1 - cos stays 0, so only a check of the vector itself (not its angle) sees it.
    _copy_run(root, "r2", "r3", {"astronaut.png": 1.02})
    out = tmp_path / "report.html"
    assert main(["report", "--root", str(root), "--output", str(out)]) == 0
    captured = capsys.readouterr()
    assert "ALERT: DRIFT: vectors of unchanged images moved between r2 and r3" in captured.err
    page = Page(out.read_text())
    check_self_contained(page)
    assert page.find("div", id="summary")[0]["attrs"]["data-drift"] == "flagged"
    (flagged,) = page.find("tr", data_run="r3", data_previous="r2")
    assert flagged["attrs"]["data-status"] == "flagged" and "astronaut.png" in flagged["text"]
    fields = fields_of(page, flagged)
    assert float(fields["max_relative_l2"]) == pytest.approx(0.02 / 1.02, rel=1e-3)  # |a - b| / |a|, a tonight's
    assert float(page.inside(flagged, "td", data_field="max_cos_distance")[0]["text"]) < 1e-6
    assert page.find("tr", data_run="r2", data_previous="r1")[0]["attrs"]["data-status"] == "ok"
    alerts = page.inside(page.find("div", id="summary")[0], "div", **{"class": "alert"})
    assert len(alerts) == 1 and "astronaut.png" in alerts[0]["text"]


def _synthetic_run(root: pathlib.Path, run_id: str, vectors: np.ndarray, previous: str | None, index: str) -> None:
    from index_fixtures import write_embeddings

    from pipeline.index.build import build_index

    run_dir = root / "runs" / run_id
    write_embeddings(str(run_dir), vectors, model="synthetic", ids=[f"img-{i:05d}.jpg" for i in range(len(vectors))])
    meta = build_index(str(run_dir), str(run_dir / "index"), IndexConfig(index_type=index, seed=0))
    n = len(vectors)
    manifest = {
        "run_id": run_id, "model": "synthetic", "published": True, "validated": True, "mode": "incremental",
        "previous_run": previous, "counts": {"seen": n, "embedded": 0, "reused": n, "failed": 0, "deleted": 0},
        "failed_by_reason": {}, "wall_seconds": 12.5, "images_per_second": None,
        "index": {k: meta[k] for k in ("index_type", "ntotal", "recall_at_10")},
    }  # fmt: skip
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    (root / "LATEST").write_text(run_id + "\n")


def test_tuning_curve_and_bounded_sampling_on_bigger_runs(tmp_path, monkeypatch):
    from pipeline import report_drift

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((40, 32))[rng.integers(0, 40, 6000)] + 0.3 * rng.standard_normal((6000, 32))).astype(
        np.float32
    )
    root = tmp_path / "root"
    _synthetic_run(root, "a", x, None, "ivf-flat")
    _synthetic_run(root, "b", x, "a", "ivf-flat")
    # Tonight's bounds, made small: a fifth of the ids keyed, 300 pairs compared, 100 kB of vectors read.
    monkeypatch.setattr(report_drift, "KEY_SAMPLE", 1200)
    report = build_report(str(root), check_sample=300, nn_sample=200, read_budget=100_000)
    page = Page(report.html)
    check_self_contained(page)
    meta = json.loads((root / "runs/b/index/index.json").read_text())
    assert meta["tuning_curve"], "an IVF index records its tuning curve"
    assert "tuning" in {e["attrs"].get("data-plot") for e in page.find("img")}
    rows = page.inside(page.find("table", id="tuning-table")[0], "tr", **{})
    shown = [
        (
            int(r["attrs"]["data-nprobe"]),
            float(page.inside(r, "td", data_field="recall_tuning")[0]["attrs"]["data-value"]),
        )
        for r in rows
        if "data-nprobe" in r["attrs"]
    ]
    assert shown == [(row["nprobe"], row["recall_tuning"]) for row in meta["tuning_curve"]]
    (check,) = report.checks
    assert check.status == "ok" and check.sampled and 0 < check.checked <= 300
    assert 4000 < check.unchanged < 8000  # estimated from the keyed fifth: about 6,000
    assert "sample" in page.find("tr", data_run="b", data_previous="a")[0]["text"]
    nn = page.find("p", id="nn-changed")[0]["attrs"]
    assert 0 < int(nn["data-compared"]) <= 200 and nn["data-changed"] == "0"  # same vectors: same neighbours


def test_report_command_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["report", "--root", str(tmp_path / "empty"), "--output", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("embedpipe report: error: ") and "holds no embedpipe run" in err[0]
    assert not (tmp_path / "r.html").exists()


@pytest.mark.slow
def test_latest_report_path_finds_the_newest_page(nightly_root, tmp_path):
    assert latest_report_path(str(nightly_root)) == f"{nightly_root}/runs/r2/report.html"
    assert latest_report_path(str(nightly_root / "runs/r1")) == f"{nightly_root}/runs/r1/report.html"
    assert latest_report_path(str(nightly_root / "runs/r1/index")) == f"{nightly_root}/runs/r1/report.html"
    assert latest_report_path(str(tmp_path)) is None
    # LATEST names a run without a page (written with --no-report): the newest page there is.
    root = tmp_path / "root"
    shutil.copytree(nightly_root, root)
    (root / "runs/r2/report.html").unlink()
    assert latest_report_path(str(root)) == f"{root}/runs/r1/report.html"


@pytest.mark.slow
def test_a_report_that_fails_never_fails_the_night_and_no_report_skips_it(tmp_path, monkeypatch, caplog):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, name in enumerate(["astronaut", "rocket"]):
        make_image(corpus / f"{name}.png", name, i)
        os.utime(corpus / f"{name}.png", (1_700_000_000 + i, 1_700_000_000 + i))
    root = tmp_path / "root"
    assert nightly(corpus, root, "a", "--no-report") == 0
    assert read_latest(str(root)) == "a" and not (root / "runs/a/report.html").exists()

    def broken(*args, **kwargs):
        raise RuntimeError("the renderer broke")

    monkeypatch.setattr("pipeline.report.write_run_report", broken)
    with caplog.at_level(logging.WARNING, logger="pipeline.nightly"):
        assert nightly(corpus, root, "b") == 0
    assert read_latest(str(root)) == "b" and manifest_of(root, "b")["published"] is True
    assert not (root / "runs/b/report.html").exists()
    assert not list((root / "runs/b").glob("report.html.tmp-*"))
    assert "run b is published, but its report could not be written (RuntimeError: the renderer broke)" in caplog.text


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def render_in_chromium(path: pathlib.Path, screenshot: pathlib.Path) -> dict:
    """Open a page file in headless Chromium: wait for every image, screenshot it; returns what the page did."""
    from test_serve_browser import chromium

    with chromium() as tools:
        tools.send("Log.enable")
        tools.send("Emulation.setDeviceMetricsOverride", width=1280, height=900, deviceScaleFactor=1, mobile=False)
        tools.send("Page.navigate", url=path.resolve().as_uri())
        images = tools.wait_for(
            "document.readyState === 'complete' && (() => { const i = Array.from(document.images);"
            " return i.every((x) => x.complete) && i.map((x) => [x.naturalWidth, x.naturalHeight]); })()"
        )
        height = tools.evaluate("document.documentElement.scrollHeight")
        shot = tools.send(
            "Page.captureScreenshot",
            format="png",
            captureBeyondViewport=True,
            clip={"x": 0, "y": 0, "width": 1280, "height": min(height, 8000), "scale": 1},
        )
        screenshot.write_bytes(base64.b64decode(shot["data"]))
        events = list(tools.events)
    errors = [e for e in events if e.get("method") == "Runtime.exceptionThrown"]
    errors += [e for e in events if e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error"]
    errors += [
        e
        for e in events
        if e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] in ("error", "assert")
    ]
    requested = [e["params"]["request"]["url"] for e in events if e.get("method") == "Network.requestWillBeSent"]
    return {"images": images, "errors": errors, "requested": requested, "height": height}


@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (Debian: apt-get install chromium)")
def test_report_renders_in_chromium(nightly_root, tmp_path):
    shot = tmp_path / "report.png"
    seen = render_in_chromium(nightly_root / "runs/r2/report.html", shot)
    assert not seen["errors"], seen["errors"]
    assert len(seen["images"]) >= 5 and all(w > 0 and h > 0 for w, h in seen["images"]), seen["images"]
    assert all(u.startswith(("file:", "data:")) for u in seen["requested"]), seen["requested"]
    with Image.open(shot) as img:
        assert img.width == 1280 and img.height == min(seen["height"], 8000) > 1000
