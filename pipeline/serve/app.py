"""The HTTP API and results page over one Searcher (FastAPI; run it with uvicorn, see serve/cli.py).

Every error is JSON: {"error": <code>, "detail": <message>} with a 4xx status
(5xx only for failures of the server itself). Endpoints and limits: docs/SERVE.md.
"""

from __future__ import annotations

import importlib.resources
import time
import urllib.parse
from typing import Annotated

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pipeline import __version__, reasons
from pipeline.index.search import Hit, ModelMismatchError, QueryImageError, Searcher, UnknownIdError

DEFAULT_MAX_UPLOAD_BYTES = 20 * 2**20
DEFAULT_SERVE_MAX_PIXELS = 50_000_000  # a 50 MP photo decodes to 150 MB; bigger uploads are refused
DEFAULT_MAX_K = 1000
# Multipart framing and the small form fields around the file; the file itself is checked exactly.
_MULTIPART_SLACK = 64 * 1024
_IMAGE_ERROR_STATUS = {reasons.NOT_AN_IMAGE: 415, reasons.TOO_MANY_PIXELS: 413}
_CODES = {404: "not_found", 405: "method_not_allowed", 413: "upload_too_large"}


class ApiError(Exception):
    """An error answered as JSON {"error": code, "detail": message} with `status`."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class _BodyTooLarge(StarletteHTTPException):
    """Raised from `receive` while FastAPI parses the form: FastAPI re-raises HTTPExceptions as they are."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body exceeds {limit:,} bytes (upload limit plus form overhead)")


class _RequestBodyLimit:
    """ASGI middleware: refuse request bodies over `max_body` bytes while they stream in.

    The declared Content-Length is checked before any byte is read, and chunked
    bodies are counted, so an oversized upload never reaches memory or disk.
    """

    def __init__(self, app: ASGIApp, max_body: int) -> None:
        self.app = app
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        too_long = declared.isdigit() and int(declared) > self.max_body
        received = 0

        async def limited() -> Message:
            nonlocal received
            if too_long:
                raise _BodyTooLarge(self.max_body)
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body:
                raise _BodyTooLarge(self.max_body)
            return message

        await self.app(scope, limited, send)


def _page() -> str:
    return importlib.resources.files("pipeline.serve").joinpath("page.html").read_text(encoding="utf-8")


def create_app(
    searcher: Searcher,
    *,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    max_pixels: int = DEFAULT_SERVE_MAX_PIXELS,
    max_k: int = DEFAULT_MAX_K,
) -> FastAPI:
    """The FastAPI app serving `searcher`: /, /search (GET by id, POST an image), /thumbnail/{id}, /stats, /healthz.

    Args:
        searcher: an open Searcher (the app does not close it).
        max_upload_bytes: largest accepted image upload (413 above).
        max_pixels: largest accepted image, width x height (413 above).
        max_k: largest number of neighbours per query (k outside 1..max_k: 422).
    """
    app = FastAPI(title="embedpipe search", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_RequestBodyLimit, max_body=max_upload_bytes + _MULTIPART_SLACK)
    page = _page()
    metric = searcher.meta["metric"]
    limits = {"max_upload_bytes": max_upload_bytes, "max_pixels": max_pixels, "max_k": max_k}

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"error": exc.code, "detail": str(exc)}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()) if p not in ('query', 'body'))}: {e.get('msg')}"
            for e in exc.errors()
        )
        return JSONResponse({"error": "invalid_request", "detail": problems}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _CODES.get(exc.status_code, f"http_{exc.status_code}")
        return JSONResponse({"error": code, "detail": str(exc.detail)}, status_code=exc.status_code)

    @app.middleware("http")
    async def _headers(request: Request, call_next):
        response = await call_next(request)
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    def check_k(k: int) -> int:
        if not 1 <= k <= max_k:
            raise ApiError(422, "k_out_of_range", f"k must be between 1 and {max_k}; got {k}")
        return k

    def payload(query: dict, k: int, hits: list[Hit], start: float) -> dict:
        def thumb(h: Hit) -> str | None:
            return f"/thumbnail/{urllib.parse.quote(h.id, safe='')}" if searcher.has_thumbnails else None

        return {
            "query": query,
            "k": k,
            "metric": metric,
            "took_ms": round((time.perf_counter() - start) * 1000, 2),
            "results": [
                {"rank": h.rank, "id": h.id, "uri": h.uri, "score": h.score, "label": h.label, "thumbnail": thumb(h)}
                for h in hits
            ],
        }

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index_page() -> HTMLResponse:
        # Everything is inline; nothing may load from elsewhere.
        csp = "default-src 'self'; img-src 'self' blob:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"
        return HTMLResponse(page, headers={"Content-Security-Policy": csp})

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok", "ntotal": searcher.ntotal}

    @app.get("/stats")
    def stats() -> dict:
        return {**searcher.stats(), "limits": limits, "server_version": __version__}

    @app.get("/search")
    def search_by_id(id: str, k: int = 10) -> dict:
        start = time.perf_counter()
        k = check_k(k)
        try:
            hits = searcher.search_ids([id], k)[0]
        except UnknownIdError as exc:
            raise ApiError(404, "unknown_id", str(exc)) from exc
        except ValueError as exc:  # an index type that cannot return stored vectors
            raise ApiError(409, "id_search_unavailable", str(exc)) from exc
        return payload({"type": "id", "id": id}, k, hits, start)

    @app.post("/search")
    def search_by_image(image: Annotated[UploadFile, File()], k: Annotated[int, Form()] = 10) -> dict:
        start = time.perf_counter()
        k = check_k(k)
        data = image.file.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            raise ApiError(413, "upload_too_large", f"the image exceeds the upload limit of {max_upload_bytes:,} bytes")
        try:
            hits = searcher.search_images([data], k, max_pixels=max_pixels)[0]
        except QueryImageError as exc:
            raise ApiError(_IMAGE_ERROR_STATUS.get(exc.reason, 400), exc.reason, str(exc)) from exc
        except ModelMismatchError as exc:
            raise ApiError(409, "image_search_unavailable", str(exc)) from exc
        except RuntimeError as exc:  # e.g. the model's weights cannot be loaded on this machine
            raise ApiError(503, "model_unavailable", f"{type(exc).__name__}: {exc}") from exc
        return payload({"type": "image", "filename": image.filename, "bytes": len(data)}, k, hits, start)

    @app.get("/thumbnail/{id:path}")
    def thumbnail(id: str) -> Response:
        try:
            data = searcher.thumbnail(id)
        except UnknownIdError as exc:
            raise ApiError(404, "unknown_id", str(exc)) from exc
        if data is None:
            raise ApiError(404, "no_thumbnail", f"no thumbnail stored for {id!r} (embed with --thumbnails)")
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "public, max-age=3600"})

    return app
