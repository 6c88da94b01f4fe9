"""JSON queries on POST /search: several vectors or stored ids in one request, one result list per query.

They run on the id/vector thread pool (parsing included: a body holds up to
--max-queries x dim numbers), never behind image decodes.
"""

from __future__ import annotations

import json
import time
import urllib.parse

import numpy as np
from starlette.requests import Request

from pipeline.index.search import Hit, Searcher, UnknownIdError
from pipeline.serve.errors import ApiError, check_k
from pipeline.serve.models import BadQuery, VectorQuery, parse_query

# Bytes of JSON per vector value ("-0.012345678901234567, "), to size the body a JSON query may have.
JSON_BYTES_PER_VALUE = 32
_SLACK = 64 * 1024
_SHOWN_IDS = 10


def hit_json(hit: Hit, thumbnails: bool) -> dict:
    """One result as the API answers it; `thumbnail` is relative to the search URL (null without thumbnails)."""
    # Relative: every endpoint sits at the app's root, wherever a proxy mounts it.
    thumb = f"thumbnail/{urllib.parse.quote(hit.id, safe='')}" if thumbnails else None
    return {"rank": hit.rank, "id": hit.id, "uri": hit.uri, "score": hit.score, "label": hit.label, "thumbnail": thumb}


class JsonQueries:
    """Reads, checks and answers JSON queries against one Searcher within the server's limits."""

    def __init__(self, searcher: Searcher, *, max_queries: int, max_k: int) -> None:
        """Args: searcher: the open index; max_queries: most vectors or ids per request; max_k: most neighbours."""
        self.searcher = searcher
        self.max_queries = max_queries
        self.max_k = max_k
        self.dim = searcher.dim
        # The body is parsed into Python objects: it may be no larger than --max-queries vectors need.
        self.max_bytes = max(2**20, max_queries * self.dim * JSON_BYTES_PER_VALUE + _SLACK)

    async def read_body(self, request: Request) -> bytes:
        """The request body, refused (413 query_too_large) from its Content-Length or as soon as it grows too large."""
        too_big = ApiError(
            413,
            "query_too_large",
            f"the JSON body exceeds {self.max_bytes:,} bytes (room for --max-queries {self.max_queries} vectors of "
            f"{self.dim} values); send fewer queries per request",
        )
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            raise too_big
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_bytes:
                raise too_big
            chunks.append(chunk)
        return b"".join(chunks)

    def answer(self, body: bytes, start: float) -> tuple[bytes, str, int]:
        """Parse, check and run a JSON query: (response body, query type "vector" or "id", number of queries).

        Raises:
            ApiError: 422 for a malformed body, too many queries, k out of range or bad vectors;
                404 naming the unknown ids; 409 where the index cannot return stored vectors.
        """
        try:
            query = parse_query(body)
        except BadQuery as exc:
            raise ApiError(422, exc.code, str(exc)) from None
        items = query.vectors if isinstance(query, VectorQuery) else query.ids
        if len(items) > self.max_queries:
            raise ApiError(
                422,
                "too_many_queries",
                f"{len(items)} queries in one request; at most {self.max_queries} (--max-queries): split them",
            )
        k = check_k(query.k, self.max_k)
        if isinstance(query, VectorQuery):
            echo, hits, kind = {"type": "vectors", "count": len(items)}, self._vector_hits(query.vectors, k), "vector"
        else:
            echo, hits, kind = {"type": "ids", "ids": items}, self._id_hits(query.ids, k), "id"
        thumbnails = self.searcher.has_thumbnails
        out = {
            "query": echo,
            "k": k,
            "metric": self.searcher.meta["metric"],
            "took_ms": round((time.perf_counter() - start) * 1000, 2),
            "results": [[hit_json(h, thumbnails) for h in row] for row in hits],
        }
        # Serialised here, not on the event loop: a batch can hold tens of thousands of hits.
        text = json.dumps(out, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        return text.encode("utf-8"), kind, len(items)

    def _vector_hits(self, vectors: list[list[float]], k: int) -> list[list[Hit]]:
        wrong = [i for i, v in enumerate(vectors) if len(v) != self.dim]
        if wrong:
            more = f" ({len(wrong)} vectors have the wrong length)" if len(wrong) > 1 else ""
            raise ApiError(
                422,
                "invalid_vector",
                f"vector {wrong[0]} has {len(vectors[wrong[0]])} values; this index holds {self.dim}-d vectors{more}",
            )
        with np.errstate(over="ignore"):  # beyond float32's range becomes inf, refused just below
            x = np.asarray(vectors, dtype=np.float32)
        bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
        if bad.size:
            raise ApiError(
                422,
                "invalid_vector",
                f"vector {bad[0]} contains NaN or infinity (or a value beyond float32's range, 3.4e38); "
                "every value must be a finite number",
            )
        if self.searcher.normalize:
            zero = np.flatnonzero(~x.any(axis=1))
            if zero.size:
                raise ApiError(
                    422,
                    "invalid_vector",
                    f"vector {zero[0]} is all zeros: a cosine index compares directions, and it has none",
                )
        try:
            return self.searcher.search_vectors(x, k)
        except ValueError as exc:
            raise ApiError(422, "invalid_vector", str(exc)) from exc

    def _id_hits(self, ids: list[str], k: int) -> list[list[Hit]]:
        unknown = []
        for value in ids:
            try:
                self.searcher.label_of(value)
            except UnknownIdError:
                unknown.append(value)
        if unknown:
            shown = ", ".join(repr(v) for v in unknown[:_SHOWN_IDS])
            if len(unknown) > _SHOWN_IDS:
                shown += f" and {len(unknown) - _SHOWN_IDS} more"
            raise ApiError(404, "unknown_id", f"{len(unknown)} of {len(ids)} ids are not in the index: {shown}")
        try:
            return self.searcher.search_ids(ids, k)
        except ValueError as exc:  # an index type that cannot return stored vectors
            raise ApiError(409, "id_search_unavailable", str(exc)) from exc
