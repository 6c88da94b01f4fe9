"""The HTTP server, started for real (uvicorn on a free loopback port) and called over HTTP with httpx."""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.parse

import httpx
import numpy as np
import pytest
from index_fixtures import (
    clustered,
    png_bytes,
    serve_in_thread,
    shared_photo_index,
    swatch_jpeg,
    write_index_dir,
)
from PIL import Image

from pipeline import reasons
from pipeline.cli import build_parser, main
from pipeline.config import ModelConfig
from pipeline.index.search import Searcher
from pipeline.sample import jpeg_bytes
from pipeline.serve.app import create_app

MAX_UPLOAD = 300_000
MAX_PIXELS = 200_000
MAX_K = 50
ODD_IDS = ["plain.jpg", "dir/sub dir/a#1?.jpg", "ünï/☃ snow.png", "100%/x&y=z.jpg", "../escape.jpg"]


@pytest.fixture(scope="module")
def photos():
    return shared_photo_index(32)


@pytest.fixture(scope="module")
def photo_server(photos):
    with Searcher.open(photos[0], batch_size=4) as searcher:
        app = create_app(searcher, max_upload_bytes=MAX_UPLOAD, max_pixels=MAX_PIXELS, max_k=MAX_K)
        with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=60) as client:
            yield client, searcher


@pytest.fixture(scope="module")
def synthetic_server(tmp_path_factory):
    """Vectors without a model (no image search), odd ids, thumbnails for some items only."""
    n = 40
    ids = ODD_IDS + [f"item-{i:03d}" for i in range(n - len(ODD_IDS))]
    thumbs = [swatch_jpeg(i) for i in range(n)]
    thumbs[1] = None
    d = write_index_dir(tmp_path_factory.mktemp("synthetic"), clustered(n, 16), ids=ids, thumbnails=thumbs)
    with (
        Searcher.open(d) as searcher,
        serve_in_thread(create_app(searcher)) as url,
        httpx.Client(base_url=url, timeout=60) as client,
    ):
        yield client, thumbs


def _error(response: httpx.Response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["error"] == code and body["detail"], body
    return body["detail"]


def test_healthz_and_stats(photo_server, photos):
    client, _ = photo_server
    assert client.get("/healthz").json() == {"status": "ok", "ntotal": len(photos[1])}
    stats = client.get("/stats").json()
    assert stats["ntotal"] == 12 and stats["dim"] == 2048 and stats["metric"] == "cosine"
    assert stats["model"] == ModelConfig(image_size=32, weights="random").fingerprint()
    assert stats["factory"] == "Flat" and stats["built_at"].startswith("2026-01-02")
    assert stats["build_seconds"] == 0.5 and stats["image_search"] is True and stats["has_thumbnails"] is True
    limits = {"max_upload_bytes": MAX_UPLOAD, "max_pixels": MAX_PIXELS, "max_k": MAX_K}
    assert {key: stats["limits"][key] for key in limits} == limits
    assert stats["limits"]["decode_memory_bytes"] == 2048 * 2**20 and stats["decode_memory"]["in_use_bytes"] == 0


def test_page_is_self_contained(photo_server):
    client, _ = photo_server
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in r.headers["content-security-policy"]
    html = r.text
    assert '<input id="file" type="file"' in html and "<script>" in html and "<style>" in html
    # No CDN, no external fonts or scripts: nothing but this server is contacted.
    assert not re.search(r"(src|href)=[\"']?(https?:)?//", html)
    assert "http://" not in html and "https://" not in html


def test_search_by_id_with_thumbnails(photo_server, photos):
    client, searcher = photo_server
    r = client.get("/search", params={"id": "chelsea.jpg", "k": 5})
    assert r.status_code == 200
    body = r.json()
    assert body["query"] == {"type": "id", "id": "chelsea.jpg"} and body["k"] == 5 and body["metric"] == "cosine"
    want = searcher.search_ids(["chelsea.jpg"], k=5)[0]
    assert [h["id"] for h in body["results"]] == [h.id for h in want]
    assert body["results"][0]["id"] == "chelsea.jpg" and body["results"][0]["rank"] == 1
    assert [h["rank"] for h in body["results"]] == [1, 2, 3, 4, 5]
    for hit in body["results"]:
        thumb = client.get(hit["thumbnail"])
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
        assert thumb.content == searcher.thumbnail(hit["id"])
        assert Image.open(io.BytesIO(thumb.content)).size[0] > 0


def test_search_by_upload(photo_server, photos):
    client, searcher = photo_server
    files = photos[1]
    data = pathlib.Path(files["coffee.jpg"]).read_bytes()
    r = client.post("/search", files={"image": ("coffee.jpg", data, "image/jpeg")}, data={"k": "4"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["query"] == {"type": "image", "filename": "coffee.jpg", "bytes": len(data)}
    hits = body["results"]
    assert hits[0]["id"] == "coffee.jpg" and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
    direct = searcher.search_images([data], k=4)[0]
    assert [h["id"] for h in hits] == [h.id for h in direct]
    np.testing.assert_allclose([h["score"] for h in hits], [h.score for h in direct], atol=1e-5)
    # Another format of the same photo: still found first; k defaults to 10 (of 12).
    png = png_bytes(Image.open(files["rocket.jpg"]))
    r = client.post("/search", files={"image": ("rocket.png", png, "image/png")})
    assert r.status_code == 200 and r.json()["results"][0]["id"] == "rocket.jpg" and len(r.json()["results"]) == 10


def _multipart_stream(boundary: str, size: int):
    yield (
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="big.jpg"\r\n'
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode()
    for _ in range(size // 65536):
        yield b"\xff" * 65536
    yield f"\r\n--{boundary}--\r\n".encode()


def test_upload_limits(photo_server, photos):
    client, _ = photo_server
    just_over = b"\xff\xd8" + b"\x00" * (MAX_UPLOAD - 1)
    detail = _error(client.post("/search", files={"image": ("a.jpg", just_over)}), 413, "upload_too_large")
    assert f"{MAX_UPLOAD:,} bytes" in detail
    # Far over: refused from Content-Length before the body is read ...
    _error(client.post("/search", files={"image": ("a.jpg", b"\xff" * 5_000_000)}), 413, "upload_too_large")
    # ... and without Content-Length (chunked), while it streams in.
    boundary = "embedpipe-test-boundary"
    r = client.post(
        "/search",
        content=_multipart_stream(boundary, 3_000_000),
        headers={"content-type": f"multipart/form-data; boundary={boundary}"},
    )
    _error(r, 413, "upload_too_large")
    # Small file, too many pixels: refused from the header.
    big = jpeg_bytes(Image.new("RGB", (600, 400), (10, 120, 30)))
    assert len(big) < MAX_UPLOAD
    detail = _error(client.post("/search", files={"image": ("big.jpg", big)}), 413, reasons.TOO_MANY_PIXELS)
    assert "240,000 pixels" in detail
    # The server still answers after all that.
    assert client.get("/healthz").status_code == 200


def test_bad_uploads(photo_server, photos):
    client, _ = photo_server
    garbage = os.urandom(5000)
    _error(client.post("/search", files={"image": ("x.jpg", garbage, "image/jpeg")}), 415, reasons.NOT_AN_IMAGE)
    text = b"this is a text file, not an image\n"
    _error(client.post("/search", files={"image": ("x.txt", text, "text/plain")}), 415, reasons.NOT_AN_IMAGE)
    _error(client.post("/search", files={"image": ("e.jpg", b"")}), 400, reasons.EMPTY_FILE)
    whole = pathlib.Path(photos[1]["astronaut.jpg"]).read_bytes()
    _error(client.post("/search", files={"image": ("t.jpg", whole[: len(whole) // 2])}), 400, reasons.TRUNCATED)
    _error(client.post("/search", data={"k": "3"}), 422, "invalid_request")  # no image field
    _error(client.post("/search", content=b"{}", headers={"content-type": "application/json"}), 422, "invalid_request")


def test_k_limits(photo_server, photos):
    client, _ = photo_server
    image = {"image": ("c.jpg", pathlib.Path(photos[1]["camera.jpg"]).read_bytes())}
    for k in ("0", "-3", str(MAX_K + 1)):
        detail = _error(client.get("/search", params={"id": "camera.jpg", "k": k}), 422, "k_out_of_range")
        assert f"between 1 and {MAX_K}" in detail
        _error(client.post("/search", files=image, data={"k": k}), 422, "k_out_of_range")
    _error(client.get("/search", params={"id": "camera.jpg", "k": "ten"}), 422, "invalid_request")
    _error(client.post("/search", files=image, data={"k": "2.5"}), 422, "invalid_request")
    r = client.get("/search", params={"id": "camera.jpg", "k": MAX_K})  # allowed; only 12 items exist
    assert r.status_code == 200 and len(r.json()["results"]) == 12


def test_unknown_ids_and_routes(photo_server):
    client, _ = photo_server
    assert "'nope.jpg'" in _error(client.get("/search", params={"id": "nope.jpg"}), 404, "unknown_id")
    _error(client.get("/thumbnail/nope.jpg"), 404, "unknown_id")
    _error(client.get("/search"), 422, "invalid_request")
    _error(client.get("/no/such/page"), 404, "not_found")
    _error(client.delete("/search"), 405, "method_not_allowed")


def test_concurrent_requests(photo_server, photos):
    client, _ = photo_server
    files = photos[1]
    names = sorted(files)

    def one(i: int):
        name = names[i % len(names)]
        if i % 2:
            r = client.get("/search", params={"id": name, "k": 3})
        else:
            r = client.post("/search", files={"image": (name, pathlib.Path(files[name]).read_bytes())}, data={"k": 3})
        return name, r

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        for name, r in pool.map(one, range(24)):
            assert r.status_code == 200, r.text
            assert r.json()["results"][0]["id"] == name


def test_odd_ids_round_trip(synthetic_server):
    client, thumbs = synthetic_server
    for i, item in enumerate(ODD_IDS):
        r = client.get("/search", params={"id": item, "k": 3})
        assert r.status_code == 200, r.text
        first = r.json()["results"][0]
        assert first["id"] == item
        # Relative to the search URL, so that it works under a proxy's path prefix.
        assert first["thumbnail"] == "thumbnail/" + urllib.parse.quote(item, safe="")
        thumb = client.get(first["thumbnail"])
        if thumbs[i] is None:
            _error(thumb, 404, "no_thumbnail")
        else:
            assert thumb.status_code == 200 and thumb.content == thumbs[i]


def test_image_search_refused_for_an_index_without_model(synthetic_server):
    client, _ = synthetic_server
    image = jpeg_bytes(Image.new("RGB", (32, 32), (1, 2, 3)))
    detail = _error(client.post("/search", files={"image": ("a.jpg", image)}), 409, "image_search_unavailable")
    assert "no model_config" in detail
    assert client.get("/stats").json()["image_search"] is False


def test_index_without_thumbnails(tmp_path):
    d = write_index_dir(tmp_path, clustered(10, 8))
    with Searcher.open(d) as searcher, serve_in_thread(create_app(searcher)) as url:
        body = httpx.get(f"{url}/search", params={"id": "item-00002", "k": 2}).json()
        assert [h["thumbnail"] for h in body["results"]] == [None, None]
        _error(httpx.get(f"{url}/thumbnail/item-00002"), 404, "no_thumbnail")


def test_serve_command_binds_loopback_and_stops_on_sigint(tmp_path):
    d = write_index_dir(tmp_path / "index", clustered(30, 8))
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "serve", "--index", d, "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        match = re.match(r"embedpipe serve: http://127\.0\.0\.1:(\d+)/", line)
        assert match, (line, proc.stderr.read() if proc.poll() is not None else "")
        url = f"http://127.0.0.1:{match.group(1)}"
        deadline = time.monotonic() + 30
        while True:
            try:
                health = httpx.get(f"{url}/healthz")
                break
            except httpx.ConnectError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        assert health.json() == {"status": "ok", "ntotal": 30}
        assert (
            httpx.get(f"{url}/search", params={"id": "item-00004", "k": 2}).json()["results"][0]["id"] == "item-00004"
        )
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "image search is unavailable" in err  # the synthetic index has no model: said once, at start


def _serve_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["serve", *argv])


def test_serve_command_errors(tmp_path, capsys):
    args = _serve_args("--index", str(tmp_path / "none"))
    assert args.host == "127.0.0.1" and args.port == 8000 and args.max_upload_mb == 20
    assert main(["serve", "--index", str(tmp_path / "none")]) == 2
    assert "embedpipe serve: error: no index directory" in capsys.readouterr().err
    d = write_index_dir(tmp_path / "index", clustered(5, 8))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert main(["serve", "--index", d, "--port", str(port)]) == 2
        assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    assert main(["serve", "--index", d, "--max-upload-mb", "0"]) == 2
    assert "must be positive" in capsys.readouterr().err
