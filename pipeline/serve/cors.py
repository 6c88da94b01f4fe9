"""Cross-origin requests (`--cors-origins`): off unless origins are named; refused preflights answer JSON."""

from __future__ import annotations

import urllib.parse
from collections.abc import Sequence

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from pipeline.serve.metrics import ERROR_KEY

METHODS = ("GET", "POST")
# Not safelisted for cross-origin reads: a page needs it to honour a 503's retry delay.
EXPOSED = ("Retry-After",)


def parse_origins(text: str) -> list[str]:
    """`ORIGIN[,ORIGIN]` as the list of allowed origins; ValueError naming the first that is not one.

    An origin is scheme://host[:port] (what browsers send in the Origin header: no path,
    no trailing slash), or `*` for any origin.
    """
    origins = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        if item == "*":
            origins.append(item)
            continue
        parts = urllib.parse.urlsplit(item)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.username or parts.password:
            raise ValueError(f"--cors-origins: {item!r} is not an origin; write scheme://host[:port], e.g. https://a.b")
        if parts.path or parts.query or parts.fragment or item.endswith(("?", "#")):
            raise ValueError(
                f"--cors-origins: {item!r} has a path; an origin is only scheme://host[:port] (no trailing slash)"
            )
        try:
            port = parts.port
        except ValueError as exc:
            raise ValueError(f"--cors-origins: {item!r} has an invalid port") from exc
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        origins.append(f"{parts.scheme}://{host}" + (f":{port}" if port is not None else ""))
    if not origins:
        raise ValueError(
            "--cors-origins: no origin given; write ORIGIN[,ORIGIN], e.g. https://a.b,http://localhost:3000"
        )
    return origins


class JsonCORSMiddleware(CORSMiddleware):
    """Starlette's CORS middleware for GET and POST from `origins`; a refused preflight is a 400 JSON error."""

    def __init__(self, app: ASGIApp, origins: Sequence[str]) -> None:
        """Args: app: the wrapped app; origins: from parse_origins."""
        super().__init__(app, allow_origins=list(origins), allow_methods=METHODS, expose_headers=EXPOSED, max_age=600)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = Headers(scope=scope) if scope["type"] == "http" else None
        if (
            headers is None
            or scope["method"] != "OPTIONS"
            or "origin" not in headers
            or "access-control-request-method" not in headers
        ):
            await super().__call__(scope, receive, send)
            return
        response = self.preflight_response(request_headers=headers)
        if response.status_code >= 400:
            refused = bytes(response.body).decode().removeprefix("Disallowed CORS ")
            allowed = ", ".join(self.allow_origins)
            asked = f"origin {headers['origin']!r}, method {headers['access-control-request-method']!r}"
            if "access-control-request-headers" in headers:
                asked += f", headers {headers['access-control-request-headers']!r}"
            detail = (
                f"cross-origin request refused ({refused}): {asked}; this server allows origins {allowed} "
                f"(--cors-origins) with {', '.join(METHODS)}"
            )
            kept = {k: v for k, v in response.headers.items() if k.lower() not in ("content-length", "content-type")}
            response = JSONResponse({"error": "cors_rejected", "detail": detail}, 400, headers=kept)
            scope[ERROR_KEY] = "cors_rejected"
        await response(scope, receive, send)
