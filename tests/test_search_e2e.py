"""End to end: real photos -> `run_embed` (Beam) -> `build_index` -> Searcher, `embedpipe query` and the server.

The query side must embed a query image exactly as the embed job embedded the
corpus (same model, same decoding), so the original photo comes back first with
cosine 1.0, and a re-compressed copy of it ranks just behind.
"""

from __future__ import annotations

import io
import json
import pathlib
import subprocess
import sys

import httpx
import pytest
from index_fixtures import serve_in_thread
from PIL import Image

from pipeline.config import EmbedConfig, IndexConfig, ModelConfig
from pipeline.index.search import Searcher
from pipeline.job import run_embed
from pipeline.sample import jpeg_bytes, make_corpus
from pipeline.serve.app import create_app

pytestmark = pytest.mark.slow


def embedpipe_query(*argv: str) -> tuple[int, str, str]:
    """Run `embedpipe query ...` as a separate process, the way a person does."""
    r = subprocess.run([sys.executable, "-m", "pipeline", "query", *argv], capture_output=True, text=True)
    return r.returncode, r.stdout, r.stderr


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from pipeline.index.build import build_index

    base = tmp_path_factory.mktemp("e2e")
    images = base / "images"
    paths = [pathlib.Path(p) for p in make_corpus(images, count=12, seed=3, with_bad=False)]
    original = next(p for p in paths if p.name.startswith("chelsea"))
    # The same photo re-compressed at JPEG quality 70: a near duplicate the index should find.
    copy = images / "copies" / "chelsea_q70.jpg"
    copy.parent.mkdir()
    copy.write_bytes(jpeg_bytes(Image.open(original).convert("RGB"), quality=70))
    cfg = EmbedConfig(
        input=str(images),
        output=str(base / "out"),
        model=ModelConfig(image_size=64, weights="random", seed=0),
        batch_size=4,
        thumbnails=True,
    )
    manifest = run_embed(cfg)
    assert manifest["counts"]["embedded"] == 13 and manifest["counts"]["failed"] == 0
    meta = build_index(str(base / "out" / "embeddings"), str(base / "index"), IndexConfig(index_type="flat", seed=0))
    return {
        "index": str(base / "index"),
        "meta": meta,
        "original": str(original),
        "original_id": original.relative_to(images).as_posix(),
        "copy": str(copy),
        "copy_id": "copies/chelsea_q70.jpg",
        "model": cfg.model,
    }


@pytest.fixture(scope="module")
def searcher(run):
    with Searcher.open(run["index"]) as s:
        yield s


def test_search_images_finds_the_photo_and_its_recompressed_copy(run, searcher):
    assert run["meta"]["model"] == run["model"].fingerprint() and run["meta"]["has_thumbnails"] is True
    assert searcher.ntotal == 13
    original, copy = searcher.search_images([run["original"], run["copy"]], k=5)
    assert original[0].id == run["original_id"] and original[0].score == pytest.approx(1.0, abs=1e-4)
    assert [h.id for h in original[:2]] == [run["original_id"], run["copy_id"]]
    assert [h.id for h in copy[:2]] == [run["copy_id"], run["original_id"]]
    # Search by the stored id agrees with search by the image it came from.
    by_id = searcher.search_ids([run["original_id"]], k=5)[0]
    assert [h.id for h in by_id] == [h.id for h in original]
    thumb = Image.open(io.BytesIO(searcher.thumbnail(run["copy_id"])))
    assert thumb.format == "JPEG" and max(thumb.size) == 128


def test_query_command_returns_the_same_ids_in_the_same_order(run, searcher):
    want = searcher.search_images([run["original"], run["copy"]], k=5)
    rc, out, err = embedpipe_query(
        "--index", run["index"], "--image", run["original"], run["copy"], "-k", "5", "--json"
    )
    assert rc == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    for query, hits in zip([run["original"], run["copy"]], want):
        got = [r for r in rows if r["query"] == query]
        assert [r["id"] for r in got] == [h.id for h in hits]
        assert [r["score"] for r in got] == pytest.approx([h.score for h in hits], abs=1e-5)
    rc, out, _ = embedpipe_query("--index", run["index"], "--id", run["copy_id"], "-k", "2")
    assert rc == 0
    table = out.splitlines()
    assert table[0] == f"query {run['copy_id']}"
    assert [line.split()[2] for line in table[2:4]] == [run["copy_id"], run["original_id"]]


def test_server_on_the_built_index(run, searcher):
    with serve_in_thread(create_app(searcher)) as url:
        data = pathlib.Path(run["copy"]).read_bytes()
        r = httpx.post(f"{url}/search", files={"image": ("q.jpg", data)}, data={"k": 3}, timeout=120)
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        assert [h["id"] for h in results[:2]] == [run["copy_id"], run["original_id"]]
        thumb = httpx.get(f"{url}/{results[1]['thumbnail']}")  # links are relative to the server root
        assert thumb.status_code == 200 and Image.open(io.BytesIO(thumb.content)).format == "JPEG"
        stats = httpx.get(f"{url}/stats").json()
        assert stats["ntotal"] == 13 and stats["index_type"] == run["meta"]["index_type"]
