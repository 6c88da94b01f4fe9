"""The HTTP API beyond single queries: OpenAPI, JSON batch queries, /metrics, relative links behind a proxy, CORS.

Every server runs for real (uvicorn on a loopback port) and is called over HTTP with
httpx; the path-prefix tests put a real reverse proxy (another uvicorn) in front of it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import socket
import threading
import urllib.parse
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from index_fixtures import (
    clustered,
    exact_neighbours,
    model_index_dir,
    serve_guarded_in_thread,
    serve_in_thread,
    swatch_jpeg,
    write_index_dir,
)
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from pipeline.cli import main
from pipeline.index.search import Searcher
from pipeline.serve.app import create_app
from pipeline.serve.connections import ConnectionGuard
from pipeline.serve.cors import parse_origins
from pipeline.serve.models import BatchSearchResponse, ErrorBody, Health, SearchResponse, Stats

N, DIM, MAX_QUERIES, MAX_K = 40, 16, 8, 25
ODD_IDS = ["dir/sub dir/a#1?.jpg", "ünï/☃ snow.png", "100%/x&y=z.jpg"]


@pytest.fixture(scope="module")
def index(tmp_path_factory) -> tuple[str, np.ndarray, list[str]]:
    vectors = clustered(N, DIM, seed=3)
    ids = ODD_IDS + [f"item-{i:03d}" for i in range(N - len(ODD_IDS))]
    thumbs = [swatch_jpeg(i) for i in range(N)]
    d = write_index_dir(tmp_path_factory.mktemp("api"), vectors, ids=ids, thumbnails=thumbs)
    return d, vectors, ids


@pytest.fixture(scope="module")
def searcher(index) -> Iterator[Searcher]:
    with Searcher.open(index[0]) as opened:
        yield opened


@pytest.fixture(scope="module")
def server(searcher) -> Iterator[tuple[httpx.Client, ConnectionGuard]]:
    """The app as `embedpipe serve` runs it: under the connection guard, which /metrics reports."""
    guard = ConnectionGuard(50, 10.0)
    app = create_app(searcher, max_queries=MAX_QUERIES, max_k=MAX_K, connection_stats=guard.stats)
    with serve_guarded_in_thread(app, guard) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield client, guard


def _error(response: httpx.Response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = ErrorBody.model_validate(response.json())
    assert body.error == code and body.detail, body
    return body.detail


def _post_json(client: httpx.Client, body: object | str) -> httpx.Response:
    text = body if isinstance(body, str) else json.dumps(body)
    return client.post("/search", content=text, headers={"content-type": "application/json"})


# ---- OpenAPI ------------------------------------------------------------------------------------


def _refs(node: object) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def test_openapi_lists_every_endpoint_and_the_json_body(server, searcher):
    client, _ = server
    r = client.get("/openapi.json")
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    spec = json.loads(r.text)
    assert spec["openapi"].startswith("3.") and spec["info"]["title"] == "embedpipe search"
    paths = spec["paths"]
    assert set(paths) == {"/", "/healthz", "/stats", "/metrics", "/search", "/thumbnail/{id}"}
    assert set(paths["/search"]) == {"get", "post"}
    schemas = spec["components"]["schemas"]
    for ref in set(_refs(spec)):  # the document is self-contained
        assert ref.startswith("#/components/schemas/") and ref.rsplit("/", 1)[1] in schemas, ref

    # POST /search takes an image upload or a JSON query, told apart by Content-Type.
    body = paths["/search"]["post"]["requestBody"]["content"]
    assert set(body) == {"multipart/form-data", "application/json"}
    assert body["multipart/form-data"]["schema"] == {"$ref": "#/components/schemas/ImageUpload"}
    assert schemas["ImageUpload"]["properties"]["image"] == {
        "type": "string", "format": "binary", "title": "Image",
        "description": "the query image (any format Pillow reads)",
    }  # fmt: skip
    variants = [v["$ref"].rsplit("/", 1)[1] for v in body["application/json"]["schema"]["oneOf"]]
    assert variants == ["VectorQuery", "IdQuery"]
    vectors = schemas["VectorQuery"]["properties"]["vectors"]
    assert (vectors["minItems"], vectors["maxItems"]) == (1, MAX_QUERIES)
    assert vectors["items"] == {"type": "array", "items": {"type": "number"}, "minItems": DIM, "maxItems": DIM}
    assert schemas["IdQuery"]["properties"]["ids"]["items"] == {"type": "string"}
    for name in ("VectorQuery", "IdQuery"):
        assert schemas[name]["additionalProperties"] is False
        assert schemas[name]["properties"]["k"] | {"default": 10} == schemas[name]["properties"]["k"]
        assert (schemas[name]["properties"]["k"]["minimum"], schemas[name]["properties"]["k"]["maximum"]) == (1, MAX_K)
    k_param = next(p for p in paths["/search"]["get"]["parameters"] if p["name"] == "k")
    assert k_param["schema"]["maximum"] == MAX_K

    # Responses: the models, and every error as {"error", "detail"} (not FastAPI's default 422 body).
    def ok_schema(path: str, method: str) -> dict:
        return paths[path][method]["responses"]["200"]["content"]["application/json"]["schema"]

    assert ok_schema("/search", "get") == {"$ref": "#/components/schemas/SearchResponse"}
    assert {v["$ref"] for v in ok_schema("/search", "post")["anyOf"]} == {
        "#/components/schemas/SearchResponse", "#/components/schemas/BatchSearchResponse",
    }  # fmt: skip
    assert ok_schema("/stats", "get") == {"$ref": "#/components/schemas/Stats"}
    assert ok_schema("/healthz", "get") == {"$ref": "#/components/schemas/Health"}
    assert "text/plain; version=0.0.4; charset=utf-8" in paths["/metrics"]["get"]["responses"]["200"]["content"]
    assert "image/jpeg" in paths["/thumbnail/{id}"]["get"]["responses"]["200"]["content"]
    for path, method, statuses in [
        ("/search", "get", {"404", "409", "422"}),
        ("/search", "post", {"400", "404", "408", "409", "413", "415", "422", "503"}),
        ("/thumbnail/{id}", "get", {"404"}),
    ]:
        responses = paths[path][method]["responses"]
        assert statuses <= set(responses), (path, method, set(responses))
        for status in statuses:
            assert responses[status]["content"]["application/json"]["schema"] == {
                "$ref": "#/components/schemas/ErrorBody"
            }
    assert "HTTPValidationError" not in schemas
    # The interactive pages would load scripts from a CDN: they stay off.
    _error(client.get("/docs"), 404, "not_found")
    _error(client.get("/redoc"), 404, "not_found")


def test_real_answers_match_the_documented_models(server, index):
    """The models behind /openapi.json forbid unknown fields: an answer that drifts from them fails here."""
    client, _ = server
    _, vectors, ids = index
    SearchResponse.model_validate(client.get("/search", params={"id": ids[5], "k": 3}).json())
    BatchSearchResponse.model_validate(_post_json(client, {"ids": ids[:2], "k": 2}).json())
    BatchSearchResponse.model_validate(_post_json(client, {"vectors": vectors[:2].tolist()}).json())
    Health.model_validate(client.get("/healthz").json())
    stats = Stats.model_validate(client.get("/stats").json())
    assert stats.connections is not None and stats.limits.max_queries == MAX_QUERIES
    assert set(client.get("/stats").json()) <= set(Stats.model_fields) | {"model_config"}


def test_openapi_names_the_proxy_prefix_when_given(searcher):
    with serve_in_thread(create_app(searcher, root_path="/embedpipe")) as url:
        assert httpx.get(f"{url}/openapi.json").json()["servers"] == [{"url": "/embedpipe"}]


# ---- JSON queries ---------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_vector_queries_find_their_stored_vectors_first(tmp_path, metric):
    vectors = clustered(30, DIM, seed=5)
    d = write_index_dir(tmp_path, vectors, metric=metric)
    picked = [7, 0, 29, 7]  # in this order, one twice
    with Searcher.open(d) as searcher, serve_in_thread(create_app(searcher)) as url:
        r = httpx.post(f"{url}/search", json={"vectors": vectors[picked].tolist(), "k": 5}, timeout=30)
    assert r.status_code == 200, r.text
    body = BatchSearchResponse.model_validate(r.json())
    assert body.query.type == "vectors" and body.query.count == 4 and body.k == 5 and body.metric == metric
    assert len(body.results) == 4
    scores, labels = exact_neighbours(vectors, vectors[picked], 5, metric)
    for row, want_scores, want_labels, label in zip(body.results, scores, labels, picked):
        assert row[0].id == f"item-{label:05d}" and row[0].rank == 1
        assert row[0].score == pytest.approx(1.0 if metric == "cosine" else 0.0, abs=1e-4)
        assert [h.label for h in row] == want_labels.tolist()
        np.testing.assert_allclose([h.score for h in row], want_scores, atol=1e-4)
        assert [h.thumbnail for h in row] == [None] * 5  # this index stores no thumbnails


def test_batch_id_queries_answer_one_list_per_id_in_order(server, searcher, index):
    client, _ = server
    _, _, ids = index
    asked = [ids[10], ODD_IDS[1], ids[10], ODD_IDS[0]]
    r = _post_json(client, {"ids": asked, "k": 4})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["query"] == {"type": "ids", "ids": asked} and len(body["results"]) == len(asked)
    for item, row in zip(asked, body["results"]):
        assert row[0]["id"] == item and [h["rank"] for h in row] == [1, 2, 3, 4]
        single = client.get("/search", params={"id": item, "k": 4}).json()["results"]
        assert row == single  # the same hits as one GET per id
    assert body["results"][0] == body["results"][2]
    # Unknown ids: 404, naming every unknown one.
    detail = _error(_post_json(client, {"ids": [ids[1], "nope-1", "nope/2"]}), 404, "unknown_id")
    assert "2 of 3 ids" in detail and "'nope-1'" in detail and "'nope/2'" in detail


def test_bad_json_queries_are_4xx_json(server, index):
    client, _ = server
    _, vectors, ids = index
    good = vectors[0].tolist()
    cases = [
        ({"vectors": [good, good[:-1]]}, "invalid_vector", f"vector 1 has {DIM - 1} values; this index holds {DIM}-d"),
        ({"vectors": [[*good, 1.0]]}, "invalid_vector", f"has {DIM + 1} values"),
        ('{"vectors": [[' + ", ".join(["NaN"] * DIM) + "]]}", "invalid_vector", "vector 0 contains NaN or infinity"),
        ('{"vectors": [[' + ", ".join(["1"] * (DIM - 1) + ["Infinity"]) + "]]}", "invalid_vector", "infinity"),
        ({"vectors": [good, [1e39] * DIM]}, "invalid_vector", "vector 1 contains NaN"),  # float32 overflow
        ({"vectors": [[0.0] * DIM]}, "invalid_vector", "vector 0 is all zeros"),  # no direction for cosine
        ({"vectors": [good] * (MAX_QUERIES + 1)}, "too_many_queries", f"{MAX_QUERIES + 1} queries in one request"),
        ({"ids": ids[:1] * (MAX_QUERIES + 1)}, "too_many_queries", f"at most {MAX_QUERIES} (--max-queries)"),
        ({"vectors": [good], "k": 0}, "k_out_of_range", f"between 1 and {MAX_K}"),
        ({"ids": ids[:1], "k": MAX_K + 1}, "k_out_of_range", f"got {MAX_K + 1}"),
        ({"ids": ids[:1], "k": "3"}, "invalid_request", "k: Input should be a valid integer"),
        ({"vectors": [["0.5"] * DIM]}, "invalid_request", "vectors.0.0: Input should be a valid number"),
        ({"vectors": [[True] * DIM]}, "invalid_request", "vectors.0.0: Input should be a valid number"),
        ({"vectors": []}, "invalid_request", "vectors: List should have at least 1 item"),
        ({"ids": [3]}, "invalid_request", "ids.0: Input should be a valid string"),
        ({"vectors": [good], "ids": ids[:1]}, "invalid_request", 'exactly one of "vectors" and "ids"'),
        ({"k": 3}, "invalid_request", "the body has neither"),
        ({"ids": ids[:1], "vector": [good]}, "invalid_request", "vector: Extra inputs are not permitted"),
        ([good], "invalid_request", "must be a JSON object"),
        ('{"ids": ["a"', "invalid_request", "not valid JSON"),
    ]
    for body, code, expected in cases:
        detail = _error(_post_json(client, body), 422 if code != "unknown_id" else 404, code)
        assert expected in detail, (body if isinstance(body, str) else str(body)[:80], detail)
    # Many bad values: one line naming the first (lists stop at their first bad item), answered at once.
    many = '{"vectors": [[' + ",".join(['"x"'] * 200_000) + "]]}"
    assert _error(_post_json(client, many), 422, "invalid_request") == "vectors.0.0: Input should be a valid number"
    # Over what --max-queries vectors need: refused from Content-Length, or as the chunks arrive.
    detail = _error(_post_json(client, "[" + "0.5," * 400_000 + "0]"), 413, "query_too_large")
    assert "--max-queries 8" in detail
    chunks = (b'{"vectors": [[' + b"0.5," * 100_000 for _ in range(20))  # chunked: no Content-Length
    r = client.post("/search", content=chunks, headers={"content-type": "application/json"})
    _error(r, 413, "query_too_large")
    assert client.get("/healthz").status_code == 200


def test_json_queries_never_wait_behind_image_decodes(tmp_path):
    """With the one image thread stuck in a decode, vector and id queries are still answered."""
    d = model_index_dir(tmp_path, 12)
    entered, release = threading.Event(), threading.Event()
    with Searcher.open(d) as searcher:
        real_decode = searcher.decode

        def stuck_decode(data: bytes, **kwargs):
            entered.set()
            assert release.wait(60)
            return real_decode(data, **kwargs)

        searcher.decode = stuck_decode
        app = create_app(searcher, image_threads=1)
        with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=60) as client:
            image = {}

            def post_image() -> None:
                # Not an image: once released, the decode refuses it (415) without building the model.
                image["r"] = client.post("/search", files={"image": ("x.jpg", b"not an image at all")})

            poster = threading.Thread(target=post_image)
            poster.start()
            try:
                assert entered.wait(30), "the image query never reached its decode"
                vectors = clustered(12, 2048)[:3].tolist()
                by_vector = client.post("/search", json={"vectors": vectors, "k": 2}, timeout=20)
                by_ids = client.post("/search", json={"ids": ["item-00001", "item-00002"], "k": 2}, timeout=20)
                assert not release.is_set() and poster.is_alive()  # the image is still being decoded
            finally:
                release.set()
                poster.join(60)
    assert by_vector.status_code == 200 and len(by_vector.json()["results"]) == 3
    assert [row[0]["id"] for row in by_ids.json()["results"]] == ["item-00001", "item-00002"]
    _error(image["r"], 415, "not_an_image")


# ---- /metrics -------------------------------------------------------------------------------------

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LABEL = r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"'
_VALUE = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?|[+-]Inf|NaN"
_SAMPLE = re.compile(rf"({_NAME})(?:\{{((?:{_LABEL},?)*)\}})? ({_VALUE})(?: -?\d+)?")
_TYPES = {"counter", "gauge", "histogram", "summary", "untyped"}


def parse_exposition(text: str) -> tuple[dict[tuple, float], dict[str, str]]:
    """A strict reader of the Prometheus text format 0.0.4: {(name, ((label, value), ...)): value}, {family: type}.

    It checks what the format requires: line syntax and escaping, one TYPE per family
    before its samples, a family's samples in one block, no duplicate series, counters
    not negative, histogram buckets cumulative up to le="+Inf" equal to _count.
    """
    assert text.endswith("\n"), "the exposition must end with a line feed"
    samples: dict[tuple, float] = {}
    types: dict[str, str] = {}
    finished: set[str] = set()
    current = None
    for line in text[:-1].split("\n"):
        assert line.strip(), "no empty lines"
        if line.startswith("#"):
            kind, name, rest = [*line.split(" ", 3), ""][1:4] if line.count(" ") >= 2 else ("", "", "")
            assert kind in ("HELP", "TYPE") and re.fullmatch(_NAME, name), line
            if kind == "TYPE":
                assert rest in _TYPES and name not in types, line
                types[name] = rest
            continue
        match = _SAMPLE.fullmatch(line)
        assert match, f"not a sample line: {line!r}"
        name, labels_text, value = match.group(1), match.group(2) or "", match.group(len(match.groups()))
        labels = tuple(
            (key, raw.replace("\\n", "\n").replace('\\"', '"').replace("\\\\", "\\"))
            for key, raw in re.findall(_LABEL, labels_text)
        )
        assert len({k for k, _ in labels}) == len(labels), f"repeated label: {line}"
        family = next((f for f in (name, re.sub(r"_(bucket|sum|count)$", "", name)) if f in types), None)
        assert family is not None, f"sample before its TYPE: {line}"
        if family != current:
            assert family not in finished, f"{family}'s samples are split: {line}"
            if current:
                finished.add(current)
            current = family
        key = (name, labels)
        assert key not in samples, f"duplicate series: {line}"
        samples[key] = float(value)
        if types[family] == "counter":
            assert name == family and name.endswith("_total") and samples[key] >= 0, line
    for family, kind in types.items():
        if kind != "histogram":
            continue
        series: dict[tuple, list[tuple[float, float]]] = {}
        for (name, labels), value in samples.items():
            if name == f"{family}_bucket":
                rest = tuple(p for p in labels if p[0] != "le")
                series.setdefault(rest, []).append((float(dict(labels)["le"]), value))
        for rest, buckets in series.items():
            buckets.sort()
            assert buckets[-1][0] == math.inf, f"{family}{rest} has no +Inf bucket"
            counts = [v for _, v in buckets]
            assert counts == sorted(counts), f"{family}{rest} buckets are not cumulative"
            assert counts[-1] == samples[(f"{family}_count", rest)] and (f"{family}_sum", rest) in samples
    return samples, types


def test_the_exposition_reader_rejects_what_the_format_forbids():
    ok = '# TYPE a_total counter\na_total{x="q\\"\\\\\\n"} 3\n# TYPE g gauge\ng -Inf\n'
    samples, _ = parse_exposition(ok)
    assert samples[("a_total", (("x", 'q"\\\n'),))] == 3 and samples[("g", ())] == -math.inf
    bad = [
        "# TYPE a_total counter\na_total 3",  # no final line feed
        "a 1\n",  # no TYPE
        '# TYPE g gauge\ng{x="a"b"} 1\n',  # unescaped quote
        "# TYPE g gauge\ng 1\ng 2\n",  # duplicate
        '# TYPE g gauge\n# TYPE h gauge\ng 1\nh 1\ng{a="1"} 1\n',  # split family
        "# TYPE a_total counter\na_total -1\n",  # negative counter
        '# TYPE h histogram\nh_bucket{le="1.0"} 2\nh_bucket{le="+Inf"} 1\nh_sum 1\nh_count 1\n',  # not cumulative
        '# TYPE h histogram\nh_bucket{le="1.0"} 1\nh_sum 1\nh_count 1\n',  # no +Inf
    ]
    for text in bad:
        with pytest.raises(AssertionError):
            parse_exposition(text)


def _scrape(client: httpx.Client) -> dict[tuple, float]:
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    return parse_exposition(r.text)[0]


def _value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(labels.items())), 0.0)


def test_metrics_count_requests_latency_errors_and_report_the_index(server, index):
    client, _ = server
    index_dir, _, ids = index
    _, types = parse_exposition(client.get("/metrics").text)
    assert types["embedpipe_http_requests_total"] == "counter"
    assert types["embedpipe_http_request_duration_seconds"] == "histogram"
    before = _scrape(client)

    assert client.get("/search", params={"id": ids[3], "k": 2}).status_code == 200
    _error(client.get("/search", params={"id": "missing"}), 404, "unknown_id")
    assert _post_json(client, {"ids": ids[:3], "k": 2}).status_code == 200
    _error(_post_json(client, {"vectors": [[1.0] * (DIM - 2)]}), 422, "invalid_vector")
    _error(client.get(f"/no/such/{'x' * 20}"), 404, "not_found")
    # Held open while scraping: the connection gauge counts them.
    with contextlib.ExitStack() as stack:
        address = (client.base_url.host, client.base_url.port)
        held = [stack.enter_context(socket.create_connection(address)) for _ in (1, 2)]
        after = _scrape(client)
        assert len(held) == 2

    def moved(name: str, **labels: str) -> float:
        return _value(after, name, **labels) - _value(before, name, **labels)

    requests = "embedpipe_http_requests_total"
    assert moved(requests, method="GET", endpoint="/search", status="200") == 1
    assert moved(requests, method="GET", endpoint="/search", status="404") == 1
    assert moved(requests, method="POST", endpoint="/search", status="200") == 1
    assert moved(requests, method="POST", endpoint="/search", status="422") == 1
    assert moved(requests, method="GET", endpoint="other", status="404") == 1  # random paths share one label
    assert moved(requests, method="GET", endpoint="/metrics", status="200") == 1  # the first scrape
    assert moved("embedpipe_http_errors_total", code="unknown_id") == 1
    assert moved("embedpipe_http_errors_total", code="invalid_vector") == 1
    assert moved("embedpipe_http_errors_total", code="not_found") == 1
    assert moved("embedpipe_search_queries_total", type="id") == 4  # one GET, a batch of three
    assert moved("embedpipe_search_queries_total", type="vector") == 0
    latency = "embedpipe_http_request_duration_seconds"
    assert moved(f"{latency}_count", method="GET", endpoint="/search") == 2
    assert moved(f"{latency}_count", method="POST", endpoint="/search") == 2
    buckets = [
        le for (name, labels), _ in after.items() if name == f"{latency}_bucket" for k, le in labels if k == "le"
    ]
    assert {"0.001", "0.1", "1.0", "60.0", "+Inf"} <= set(buckets)
    assert _value(after, f"{latency}_sum", method="GET", endpoint="/search") > 0
    assert not any("missing" in str(key) or "x" * 20 in str(key) for key in after)

    assert _value(after, "embedpipe_index_vectors") == N and _value(after, "embedpipe_index_dimension") == DIM
    assert _value(after, "embedpipe_index_bytes") == os.path.getsize(f"{index_dir}/index.faiss") > 0
    assert _value(after, "embedpipe_decode_memory_in_use_bytes") == 0
    assert _value(after, "embedpipe_decode_memory_budget_bytes") == 2048 * 2**20
    assert _value(after, "embedpipe_http_requests_in_flight") == 1  # the scrape itself
    assert _value(after, "embedpipe_connections_open") >= 3  # the client's and the two held
    assert _value(after, "embedpipe_connections_max") == 50
    assert _value(after, "process_resident_memory_bytes") > 10 * 2**20


def test_metrics_escape_label_values_exactly():
    from pipeline.serve.metrics import Counter, Histogram, format_value, render

    counter = Counter("t_total", "help with \\ and\nnewline", ("v",))
    counter.inc('a"b\\c\nd')
    counter.inc("plain", amount=2.5)
    hist = Histogram("h_seconds", "h", ("e",), (0.5, 1, 2))
    for value in (0.2, 0.5, 0.7, 3):
        hist.observe(value, "x")
    text = render([counter, hist])
    assert "# HELP t_total help with \\\\ and\\nnewline\n" in text
    samples, _ = parse_exposition(text)
    assert samples[("t_total", (("v", 'a"b\\c\nd'),))] == 1 and samples[("t_total", (("v", "plain"),))] == 2.5
    got = [samples[("h_seconds_bucket", (("e", "x"), ("le", le)))] for le in ("0.5", "1.0", "2.0", "+Inf")]
    assert got == [2, 3, 3, 4]
    assert samples[("h_seconds_sum", (("e", "x"),))] == pytest.approx(4.4)
    assert [format_value(v) for v in (3.0, 0.25, math.inf, -math.inf, math.nan, 1e300)] == [
        "3", "0.25", "+Inf", "-Inf", "NaN", "1e+300",
    ]  # fmt: skip


# ---- relative links behind a path prefix ---------------------------------------------------------


def prefix_proxy(backend: str, prefix: str) -> Starlette:
    """A reverse proxy serving `backend` under `prefix` (stripped before forwarding); 404 outside it."""
    client = httpx.AsyncClient(timeout=30)
    hop = {"host", "content-length", "connection", "transfer-encoding", "keep-alive"}

    async def forward(request: Request) -> Response:
        raw = request.scope["raw_path"].decode("ascii")  # still percent-encoded, as the client sent it
        if raw != prefix and not raw.startswith(prefix + "/"):
            return JSONResponse({"proxy": f"{raw} is outside {prefix}"}, status_code=404)
        query = request.scope["query_string"].decode("ascii")
        url = backend + (raw[len(prefix) :] or "/") + (f"?{query}" if query else "")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in hop}
        upstream = await client.request(request.method, url, headers=headers, content=await request.body())
        kept = {k: v for k, v in upstream.headers.items() if k.lower() not in hop | {"content-encoding"}}
        return Response(upstream.content, upstream.status_code, headers=kept)

    methods = ["GET", "POST", "OPTIONS"]
    return Starlette(routes=[Route("/", forward, methods=methods), Route("/{rest:path}", forward, methods=methods)])


@pytest.fixture(scope="module")
def proxied(searcher) -> Iterator[str]:
    """The proxy's URL with the prefix: {proxy}/embedpipe/... reaches the app's /..."""
    with serve_in_thread(create_app(searcher)) as backend, serve_in_thread(prefix_proxy(backend, "/embedpipe")) as url:
        assert httpx.get(f"{url}/search", params={"id": "item-001"}).status_code == 404  # outside the prefix
        yield f"{url}/embedpipe"


def test_thumbnail_links_work_under_a_path_prefix(proxied, searcher, index):
    _, _, ids = index
    with httpx.Client(timeout=30) as client:
        for item in [*ODD_IDS, ids[20]]:
            r = client.get(f"{proxied}/search", params={"id": item, "k": 3})
            assert r.status_code == 200, r.text
            for hit in r.json()["results"]:
                assert not hit["thumbnail"].startswith("/") and "://" not in hit["thumbnail"]
                link = urllib.parse.urljoin(str(r.url), hit["thumbnail"])  # what a browser does
                assert link.startswith(f"{proxied}/thumbnail/")
                thumb = client.get(link)
                assert thumb.status_code == 200 and thumb.content == searcher.thumbnail(hit["id"])
        r = client.post(f"{proxied}/search", json={"ids": [ODD_IDS[2]], "k": 2})
        link = urllib.parse.urljoin(str(r.url), r.json()["results"][0][0]["thumbnail"])
        assert client.get(link).content == searcher.thumbnail(ODD_IDS[2])


def test_the_page_uses_only_relative_links(proxied):
    for page_url in (proxied, f"{proxied}/"):
        r = httpx.get(page_url)
        assert r.status_code == 200 and "<script>" in r.text
        # No root-relative or absolute URL anywhere: "/search" would leave the prefix.
        assert not re.search(r"""["'`(]/[A-Za-z]""", r.text), re.findall(r"""["'`(]/[A-Za-z][^"'`]*""", r.text)
        assert not re.search(r"""(src|href|action)=["']?/""", r.text)


@pytest.mark.browser
def test_the_page_works_under_a_path_prefix_in_a_browser(proxied):
    """Headless Chromium opens the page at /embedpipe and /embedpipe/: stats, an id search and thumbnails load."""
    browser = pytest.importorskip("test_serve_browser")
    if browser.CHROMIUM is None:
        pytest.skip("headless Chromium is not installed (Debian: apt-get install chromium)")
    origin = proxied.rsplit("/embedpipe", 1)[0]
    for page_url in (proxied, f"{proxied}/"):
        with browser.chromium() as tools:
            wanted = ODD_IDS[1]
            tools.send("Page.navigate", url=f"{page_url}#id={urllib.parse.quote(wanted, safe='')}")
            stats = tools.wait_for(
                "document.body?.dataset.ready === '1' && document.querySelector('#stats').textContent"
            )
            assert f"{N} images" in stats
            grid = tools.wait_for(browser.loaded_grid(f"g[0].id === {json.dumps(wanted)}"))
            assert len(grid) == 12 and all(h["loaded"] for h in grid)
            requested = [
                e["params"]["request"]["url"] for e in tools.events if e.get("method") == "Network.requestWillBeSent"
            ]
            # The browser's own request for /favicon.ico is not the page's doing.
            fetched = [u for u in requested if u.startswith(origin) and u != f"{origin}/favicon.ico"]
            assert fetched and all(u.startswith(f"{proxied}") for u in fetched), fetched
            assert any("/embedpipe/thumbnail/" in u for u in fetched) and any("/embedpipe/stats" in u for u in fetched)


# ---- CORS -----------------------------------------------------------------------------------------

PREFLIGHT = {
    "Origin": "https://app.example",
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "content-type",
}


def test_cors_is_off_by_default(server, index):
    client, _ = server
    r = client.get("/search", params={"id": index[2][4]}, headers={"Origin": "https://app.example"})
    assert r.status_code == 200 and not [h for h in r.headers if h.startswith("access-control-")]
    r = client.options("/search", headers=PREFLIGHT)
    _error(r, 405, "method_not_allowed")
    assert not [h for h in r.headers if h.startswith("access-control-")]


def test_cors_origins_allow_those_origins_only(searcher, index):
    _, vectors, ids = index
    app = create_app(searcher, cors_origins=parse_origins(" https://app.example, http://localhost:3000 "))
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        r = client.options("/search", headers=PREFLIGHT)
        assert r.status_code == 200, r.text
        assert r.headers["access-control-allow-origin"] == "https://app.example"
        assert {m.strip() for m in r.headers["access-control-allow-methods"].split(",")} == {"GET", "POST"}
        assert "content-type" in r.headers["access-control-allow-headers"].lower()
        assert "Origin" in r.headers["vary"]
        r = client.post(
            "/search", json={"vectors": vectors[:1].tolist(), "k": 2}, headers={"Origin": "http://localhost:3000"}
        )
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://localhost:3000"
        assert r.headers["access-control-expose-headers"] == "Retry-After"
        # An error is readable cross-origin too.
        r = client.get("/search", params={"id": "nope"}, headers={"Origin": "https://app.example"})
        _error(r, 404, "unknown_id")
        assert r.headers["access-control-allow-origin"] == "https://app.example"
        # Another origin: the preflight is refused in JSON, and no response carries an allow header for it.
        detail = _error(client.options("/search", headers={**PREFLIGHT, "Origin": "https://evil.example"}), 400,
                        "cors_rejected")  # fmt: skip
        assert "'https://evil.example'" in detail and "--cors-origins" in detail
        _error(client.options("/search", headers={**PREFLIGHT, "Access-Control-Request-Method": "DELETE"}), 400,
               "cors_rejected")  # fmt: skip
        r = client.get("/search", params={"id": ids[4]}, headers={"Origin": "https://evil.example"})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
        metrics = parse_exposition(client.get("/metrics").text)[0]
        assert _value(metrics, "embedpipe_http_errors_total", code="cors_rejected") == 2
        assert _value(metrics, "embedpipe_http_requests_total", method="OPTIONS", endpoint="/search", status="200") == 1


def test_cors_origins_are_checked(tmp_path, capsys):
    assert parse_origins("*") == ["*"]
    assert parse_origins("HTTPS://App.Example:8443,http://[::1]:3000") == [
        "https://app.example:8443",
        "http://[::1]:3000",
    ]
    for bad, says in [
        ("https://app.example/", "has a path"),
        ("app.example", "is not an origin"),
        ("ftp://app.example", "is not an origin"),
        ("https://u:p@app.example", "is not an origin"),
        ("https://app.example:99999", "invalid port"),
        (" , ", "no origin given"),
    ]:
        with pytest.raises(ValueError, match=says):
            parse_origins(bad)
    d = write_index_dir(tmp_path / "index", clustered(5, 8))
    for argv, says in [
        (["--cors-origins", "https://app.example/"], "--cors-origins: 'https://app.example/' has a path"),
        (["--max-queries", "0"], "--max-queries 0: must be positive"),
        (["--root-path", "embedpipe"], "--root-path 'embedpipe': must be a path that starts with /"),
    ]:
        assert main(["serve", "--index", d, *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("embedpipe serve: error: ") and says in err and err.count("\n") == 1, err
