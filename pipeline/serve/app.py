"""The HTTP API and results page over one Searcher (FastAPI; run it with uvicorn, see serve/cli.py).

Every error is JSON: {"error": <code>, "detail": <message>} with a 4xx status
(5xx only for failures of the server itself). Every link the server hands out is
relative, so the app works unchanged under a reverse proxy's path prefix.
Endpoints, limits, metrics: docs/SERVE.md; the schema: GET /openapi.json.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import importlib.resources
import os
import time
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any, BinaryIO, TypeVar

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import TypeAdapter, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipeline import __version__, reasons
from pipeline.index.search import Hit, ModelMismatchError, QueryImageError, Searcher, UnknownIdError
from pipeline.serve.cors import JsonCORSMiddleware
from pipeline.serve.errors import ApiError, check_k, error_responses
from pipeline.serve.limits import (
    DEFAULT_BODY_TIMEOUT,
    DEFAULT_DECODE_MEMORY_MB,
    DEFAULT_DECODE_WAIT,
    DEFAULT_MAX_K,
    DEFAULT_MAX_QUERIES,
    DEFAULT_MAX_UPLOAD_BYTES,
    DEFAULT_SERVE_MAX_PIXELS,
)
from pipeline.serve.memory import BudgetTimeout, DecodeBudget, decode_cost, release_memory
from pipeline.serve.metrics import CONTENT_TYPE, ERROR_KEY, MetricsMiddleware, RequestMetrics, render, server_gauges
from pipeline.serve.middleware import RequestBodyGuard
from pipeline.serve.models import BatchSearchResponse, Health, SearchResponse, Stats, describe, install_openapi
from pipeline.serve.pages import add_pages
from pipeline.serve.queries import JsonQueries, hit_json

# Multipart framing and the small form fields around the file; the file itself is checked exactly.
_MULTIPART_SLACK = 64 * 1024
# Decodes estimated above this hand their freed memory back to the OS when they end.
_TRIM_ABOVE = 64 << 20
_IMAGE_ERROR_STATUS = {reasons.NOT_AN_IMAGE: 415, reasons.TOO_MANY_PIXELS: 413}
_CODES = {404: "not_found", 405: "method_not_allowed", 408: "body_timeout", 413: "upload_too_large"}
_FORM_K = TypeAdapter(int)
_T = TypeVar("_T")


def _page() -> str:
    return importlib.resources.files("pipeline.serve").joinpath("page.html").read_text(encoding="utf-8")


def _default_threads() -> tuple[int, int]:
    cores = os.cpu_count() or 2
    return min(8, max(2, cores)), min(16, max(4, cores))


def create_app(
    searcher: Searcher,
    *,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    max_pixels: int = DEFAULT_SERVE_MAX_PIXELS,
    max_k: int = DEFAULT_MAX_K,
    decode_memory_bytes: int = DEFAULT_DECODE_MEMORY_MB * 2**20,
    decode_wait: float = DEFAULT_DECODE_WAIT,
    body_timeout: float = DEFAULT_BODY_TIMEOUT,
    image_threads: int | None = None,
    search_threads: int | None = None,
    connection_stats: Callable[[], dict] | None = None,
    max_queries: int = DEFAULT_MAX_QUERIES,
    cors_origins: list[str] | None = None,
    root_path: str = "",
    report_root: str | None = None,
    duplicates: str | None = None,
) -> FastAPI:
    """The FastAPI app serving `searcher`: /, /search, /thumbnail/{id}, /stats, /healthz, /metrics, /openapi.json.

    GET /search finds the neighbours of a stored id; POST /search those of an uploaded
    image (multipart) or of several vectors or ids (JSON). Image queries run on one
    thread pool, id and vector queries on another, so the latter never wait behind
    image decoding; decodes also wait for their estimated memory (serve/memory.py)
    to fit `decode_memory_bytes`.

    Args:
        searcher: an open Searcher (the app does not close it).
        max_upload_bytes: largest accepted image upload (413 above).
        max_pixels: largest accepted image, width x height (413 above).
        max_k: largest number of neighbours per query (k outside 1..max_k: 422).
        decode_memory_bytes: memory all concurrent decodes may use together.
        decode_wait: seconds an image query waits for decode memory before a 503.
        body_timeout: seconds the whole request body may take to arrive (408 after).
        image_threads, search_threads: sizes of the two thread pools (default: from the cores).
        connection_stats: reports the server's connection counts for /stats and /metrics.
        max_queries: most vectors or ids in one JSON query (422 above).
        cors_origins: origins allowed to call the API from a browser (from cors.parse_origins); none: no CORS.
        root_path: the path prefix a reverse proxy serves the app under, for the `servers` of /openapi.json
            (links are relative: the app needs no prefix to work behind the proxy).
        report_root: nightly root whose newest report /report shows (default: the index's own run, if any).
        duplicates: groups Parquet (`embedpipe duplicates --output`) that /duplicates renders.
    """
    default_image, default_search = _default_threads()
    image_pool = concurrent.futures.ThreadPoolExecutor(image_threads or default_image, "embedpipe-image")
    search_pool = concurrent.futures.ThreadPoolExecutor(search_threads or default_search, "embedpipe-search")
    budget = DecodeBudget(decode_memory_bytes)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            image_pool.shutdown(wait=False, cancel_futures=True)
            search_pool.shutdown(wait=False, cancel_futures=True)

    # redirect_slashes off: Starlette would answer /search/ with a redirect built from the Host header.
    # The interactive docs pages load their scripts from a CDN, so only the schema is served.
    app = FastAPI(
        title="embedpipe search",
        version=__version__,
        description="Nearest neighbours in an embedpipe index, by image, stored id or vector. See docs/SERVE.md.",
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json",
        redirect_slashes=False,
        lifespan=lifespan,
    )
    app.add_middleware(RequestBodyGuard, max_body=max_upload_bytes + _MULTIPART_SLACK, timeout=body_timeout)
    page = _page()
    metric = searcher.meta["metric"]
    json_queries = JsonQueries(searcher, max_queries=max_queries, max_k=max_k)
    metrics = RequestMetrics()
    families = [*metrics.families(), *server_gauges(searcher, budget, connection_stats)]
    limits = {
        "max_upload_bytes": max_upload_bytes,
        "max_pixels": max_pixels,
        "max_k": max_k,
        "max_queries": max_queries,
        "decode_memory_bytes": decode_memory_bytes,
        "decode_wait_s": decode_wait,
        "body_timeout_s": body_timeout,
    }

    async def run(pool: concurrent.futures.Executor, fn: Callable[..., _T], *args: Any) -> _T:
        return await asyncio.get_running_loop().run_in_executor(pool, functools.partial(fn, *args))

    def error(request: Request, status: int, code: str, detail: str, headers: dict | None = None) -> JSONResponse:
        request.scope[ERROR_KEY] = code  # for /metrics' errors by code
        return JSONResponse({"error": code, "detail": detail}, status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error(request, exc.status, exc.code, str(exc), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error(request, 422, "invalid_request", describe(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _CODES.get(exc.status_code, f"http_{exc.status_code}")
        return error(request, exc.status_code, code, str(exc.detail), exc.headers)

    @app.middleware("http")
    async def _headers(request: Request, call_next):
        response = await call_next(request)
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    def payload(query: dict, k: int, hits: list[Hit], start: float) -> dict:
        return {
            "query": query,
            "k": k,
            "metric": metric,
            "took_ms": round((time.perf_counter() - start) * 1000, 2),
            "results": [hit_json(h, searcher.has_thumbnails) for h in hits],
        }

    @app.get("/", response_class=HTMLResponse, summary="The results page")
    async def index_page() -> HTMLResponse:
        # Everything is inline; nothing may load from elsewhere.
        csp = "default-src 'self'; img-src 'self' blob:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"
        return HTMLResponse(page, headers={"Content-Security-Policy": csp})

    @app.get("/healthz", response_model=Health)
    async def healthz() -> Response:
        return JSONResponse({"status": "ok", "ntotal": searcher.ntotal})

    def stats_now() -> dict:
        out = {**searcher.stats(), "limits": limits, "server_version": __version__}
        out["decode_memory"] = {"in_use_bytes": budget.used, "waiting": budget.waiting}
        if connection_stats is not None:
            out["connections"] = connection_stats()
        return out

    @app.get("/stats", response_model=Stats)
    async def stats() -> Response:
        return JSONResponse(await run(search_pool, stats_now))

    @app.get(
        "/metrics",
        response_class=Response,
        summary="Prometheus metrics",
        responses={200: {"description": "the text exposition format 0.0.4", "content": {CONTENT_TYPE: {}}}},
    )
    async def metrics_text() -> Response:
        return Response(render(families), media_type=CONTENT_TYPE)

    def by_id(id: str, k: int) -> list[Hit]:
        try:
            return searcher.search_ids([id], k)[0]
        except UnknownIdError as exc:
            raise ApiError(404, "unknown_id", str(exc)) from exc
        except ValueError as exc:  # an index type that cannot return stored vectors
            raise ApiError(409, "id_search_unavailable", str(exc)) from exc

    @app.get("/search", response_model=SearchResponse, responses=error_responses(404, 409, 422))
    async def search_by_id(id: Annotated[str, Query(description="a stored id (URL-encoded)")], k: int = 10) -> Response:
        """Neighbours of a stored item; the item itself is hit 1."""
        start = time.perf_counter()
        k = check_k(k, max_k)
        hits = await run(search_pool, by_id, id, k)
        metrics.queries.inc("id")
        return JSONResponse(payload({"type": "id", "id": id}, k, hits, start))

    def estimate(file: BinaryIO, nbytes: int) -> int:
        file.seek(0)
        qm = searcher.query_model
        return decode_cost(
            file, nbytes=nbytes, size=qm.config().image_size, draft_for_thumbnail=qm.thumbnails, max_pixels=max_pixels
        )

    def decode(file: BinaryIO, cost: int) -> np.ndarray:
        try:
            file.seek(0)
            data = file.read(max_upload_bytes + 1)
            if len(data) > max_upload_bytes:
                raise ApiError(
                    413, "upload_too_large", f"the image exceeds the upload limit of {max_upload_bytes:,} bytes"
                )
            return searcher.decode(data, max_pixels=max_pixels)
        except QueryImageError as exc:
            raise ApiError(_IMAGE_ERROR_STATUS.get(exc.reason, 400), exc.reason, str(exc)) from exc
        finally:
            data = None  # the encoded bytes go before the heap is trimmed
            if cost > _TRIM_ABOVE:
                release_memory()

    def embed_and_search(pixels: np.ndarray, k: int) -> list[Hit]:
        try:
            return searcher.search_vectors(searcher.embed_pixels(pixels[None]), k)[0]
        except RuntimeError as exc:  # e.g. the model's weights cannot be loaded on this machine
            raise ApiError(503, "model_unavailable", f"{type(exc).__name__}: {exc}") from exc

    async def search_image(image: UploadFile, k: int, start: float) -> dict:
        nbytes = image.size if image.size is not None else await run(image_pool, _length, image.file)
        if nbytes > max_upload_bytes:
            raise ApiError(413, "upload_too_large", f"the image exceeds the upload limit of {max_upload_bytes:,} bytes")
        try:
            searcher.model_config()
        except ModelMismatchError as exc:
            raise ApiError(409, "image_search_unavailable", str(exc)) from exc
        cost = await run(image_pool, estimate, image.file, nbytes)
        try:
            async with budget.reserve(cost, decode_wait):
                pixels = await run(image_pool, decode, image.file, cost)
        except BudgetTimeout as exc:
            raise ApiError(
                503,
                "server_busy",
                f"too many large images are being decoded: {exc} (--decode-memory-mb); retry in a few seconds",
                headers={"Retry-After": "5"},
            ) from exc
        hits = await run(image_pool, embed_and_search, pixels, k)
        metrics.queries.inc("image")
        return payload({"type": "image", "filename": image.filename, "bytes": nbytes}, k, hits, start)

    async def search_form(request: Request, start: float) -> Response:
        async with request.form() as form:
            image = form.get("image")
            if not isinstance(image, UploadFile):
                problem = "Field required" if image is None else "must be a file, not a text field"
                raise ApiError(
                    422, "invalid_request", f"image: {problem}; send the image as multipart/form-data field image"
                )
            try:
                k = _FORM_K.validate_python(form.get("k", "10"))
            except ValidationError as exc:
                raise ApiError(422, "invalid_request", describe([{**e, "loc": ("k",)} for e in exc.errors()])) from None
            return JSONResponse(await search_image(image, check_k(k, max_k), start))

    @app.post(
        "/search",
        response_model=SearchResponse | BatchSearchResponse,
        responses=error_responses(400, 404, 408, 409, 413, 415, 422, 503),
    )
    async def search_post(request: Request) -> Response:
        """Neighbours of an uploaded image (multipart/form-data), or of several vectors or ids (application/json).

        A JSON query answers one result list per vector or id, in order.
        """
        start = time.perf_counter()
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type != "application/json":
            return await search_form(request, start)
        body = await json_queries.read_body(request)
        text, kind, count = await run(search_pool, json_queries.answer, body, start)
        metrics.queries.inc(kind, amount=count)
        return Response(text, media_type="application/json")

    def thumbnail_of(id: str) -> bytes:
        try:
            data = searcher.thumbnail(id)
        except UnknownIdError as exc:
            raise ApiError(404, "unknown_id", str(exc)) from exc
        if data is None:
            raise ApiError(404, "no_thumbnail", f"no thumbnail stored for {id!r} (embed with --thumbnails)")
        return data

    @app.get(
        "/thumbnail/{id:path}",
        response_class=Response,
        responses={200: {"description": "the stored JPEG", "content": {"image/jpeg": {}}}, **error_responses(404)},
    )
    async def thumbnail(id: str) -> Response:
        """The stored thumbnail of an item (its id URL-encoded, / included)."""
        data = await run(search_pool, thumbnail_of, id)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "public, max-age=3600"})

    install_openapi(app, dim=searcher.dim, max_queries=max_queries, max_k=max_k, root_path=root_path)
    if cors_origins:
        app.add_middleware(JsonCORSMiddleware, origins=cors_origins)
    # Outermost: it sees every answer, CORS preflights and body-limit errors included.
    app.add_middleware(MetricsMiddleware, metrics=metrics, routes=app.router.routes)
    add_pages(app, index_dir=searcher.index_dir, report_root=report_root, duplicates=duplicates)
    return app


def _length(file: BinaryIO) -> int:
    file.seek(0, os.SEEK_END)
    return file.tell()
