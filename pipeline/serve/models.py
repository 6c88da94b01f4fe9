"""The HTTP API's bodies as pydantic models: what /openapi.json documents and what JSON queries are checked against.

Search responses are built as plain dicts on the hot path (a batch can hold 64 x 1000
hits); tests/test_serve_api.py validates real responses against these models, which
forbid unknown fields, so the documented schema and the answers cannot drift apart.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import pydantic_core
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr, ValidationError
from pydantic.json_schema import models_json_schema

# Each error is named by where it is (vectors.3.17) and what is wrong; a body can hold millions of values,
# so lists stop at their first bad item and at most this many problems are reported.
MAX_PROBLEMS = 5


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorBody(_Strict):
    """Every 4xx and 5xx answer."""

    error: str = Field(description="a stable code, e.g. unknown_id, k_out_of_range, invalid_vector")
    detail: str = Field(description="what went wrong and what to do, in one line")


class Hit(_Strict):
    """One neighbour."""

    rank: int = Field(description="1-based position")
    id: str
    uri: str
    score: float = Field(description="cosine similarity (higher is closer) or L2 distance (lower is closer)")
    label: int = Field(description="the item's row in the index")
    thumbnail: str | None = Field(
        description="link to the stored thumbnail, relative to the URL of the search (null without thumbnails)"
    )


class IdEcho(_Strict):
    type: Literal["id"]
    id: str


class ImageEcho(_Strict):
    type: Literal["image"]
    filename: str | None
    bytes: int


class VectorsEcho(_Strict):
    type: Literal["vectors"]
    count: int


class IdsEcho(_Strict):
    type: Literal["ids"]
    ids: list[str]


class SearchResponse(_Strict):
    """One query's neighbours (GET /search by id, POST /search with an image)."""

    query: Annotated[IdEcho | ImageEcho, Field(discriminator="type")]
    k: int
    metric: str = Field(description="cosine or l2: how to read score")
    took_ms: float
    results: list[Hit]


class BatchSearchResponse(_Strict):
    """Several queries' neighbours (POST /search with a JSON body): results[i] answers query i."""

    query: Annotated[VectorsEcho | IdsEcho, Field(discriminator="type")]
    k: int
    metric: str
    took_ms: float
    results: list[list[Hit]]


_QueryList = Field(fail_fast=True, min_length=1)


class VectorQuery(_Strict):
    """Neighbours of query vectors (each of the index's dimension, finite)."""

    vectors: Annotated[list[Annotated[list[StrictFloat], Field(fail_fast=True)]], _QueryList]
    k: StrictInt = Field(10, description="neighbours per query")


class IdQuery(_Strict):
    """Neighbours of stored items, found with their stored vectors (each item is its own hit 1)."""

    ids: Annotated[list[StrictStr], _QueryList]
    k: StrictInt = Field(10, description="neighbours per query")


class ImageUpload(BaseModel):
    """The multipart form of an image query."""

    image: bytes = Field(description="the query image (any format Pillow reads)")
    k: int = Field(10, description="neighbours")


class Health(_Strict):
    status: Literal["ok"]
    ntotal: int


class Limits(_Strict):
    max_upload_bytes: int
    max_pixels: int
    max_k: int
    max_queries: int = Field(description="most queries in one JSON search")
    decode_memory_bytes: int
    decode_wait_s: float
    body_timeout_s: float


class DecodeMemory(_Strict):
    in_use_bytes: int
    waiting: int


class Connections(_Strict):
    open: int
    max_connections: int
    header_timeout_s: float
    shed_idle: int
    refused_all_busy: int
    header_timeouts: int


class Stats(BaseModel):
    """What the index is (index.json's facts), what the server allows, and what it is doing."""

    model_config = ConfigDict(extra="allow")

    factory: str | None
    index_type: str | None
    metric: str
    faiss_metric: str | None
    normalized: bool | None
    model: str | None
    model_config_: dict[str, Any] | None = Field(alias="model_config")
    source: str | None
    built_at: str | None
    build_seconds: float | None
    train_size: int | None
    search_params: dict[str, Any] | None
    recall_at_10: float | None
    recall_queries: int | None
    bytes: int | None
    embedpipe_version: str | None
    index_dir: str
    ntotal: int
    dim: int
    has_thumbnails: bool
    memory_mapped: bool
    image_search: bool
    image_search_error: str | None
    limits: Limits
    server_version: str
    decode_memory: DecodeMemory
    connections: Connections | None = Field(None, description="present when run by embedpipe serve")


class BadQuery(ValueError):
    """A JSON query that cannot be answered; `code` is its error code (the status is 422)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def describe(errors: list[dict]) -> str:
    """Validation errors in one line: `where: what` for the first MAX_PROBLEMS, and how many more."""
    parts = [
        f"{'.'.join(str(p) for p in e.get('loc', ()) if p not in ('query', 'body')) or 'body'}: {e.get('msg')}"
        for e in errors[:MAX_PROBLEMS]
    ]
    if len(errors) > MAX_PROBLEMS:
        parts.append(f"and {len(errors) - MAX_PROBLEMS} more")
    return "; ".join(parts)


def parse_query(body: bytes) -> VectorQuery | IdQuery:
    """A JSON search body as a VectorQuery or an IdQuery; BadQuery(invalid_request) if it is neither."""
    try:
        data = pydantic_core.from_json(body)
    except ValueError as exc:
        raise BadQuery("invalid_request", f"the body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadQuery("invalid_request", 'the body must be a JSON object: {"vectors": [[...]]} or {"ids": [...]}')
    given = [key for key in ("vectors", "ids") if key in data]
    if len(given) != 1:
        what = "both" if given else "neither"
        raise BadQuery("invalid_request", f'give exactly one of "vectors" and "ids"; the body has {what}')
    model = VectorQuery if given[0] == "vectors" else IdQuery
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise BadQuery("invalid_request", describe(exc.errors())) from None


_INVALID = "invalid request"
_ERROR_CONTENT = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}


def _schema_of(*models: type[BaseModel]) -> dict:
    _, top = models_json_schema([(m, "validation") for m in models], ref_template="#/components/schemas/{model}")
    return top.get("$defs", {})


def install_openapi(app: FastAPI, *, dim: int, max_queries: int, max_k: int, root_path: str = "") -> None:
    """Make app.openapi() describe POST /search's two bodies and this server's limits (dimension, k, queries).

    FastAPI documents one request body per operation; POST /search takes a multipart
    image or a JSON query, told apart by Content-Type, so its body is written here.
    """

    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        # FastAPI documents its own 422 body wherever there are parameters; ours is ErrorBody everywhere.
        for operation in (op for item in schema["paths"].values() for op in item.values()):
            invalid = operation.get("responses", {}).get("422", {})
            if "HTTPValidationError" in str(invalid.get("content", "")):
                invalid.update(description=_INVALID, content=_ERROR_CONTENT)
        for name in ("HTTPValidationError", "ValidationError"):
            components.pop(name, None)
        components.update(_schema_of(VectorQuery, IdQuery, ImageUpload))
        k_bounds = {"minimum": 1, "maximum": max_k}
        for name in ("VectorQuery", "IdQuery", "ImageUpload"):
            components[name]["properties"]["k"].update(k_bounds)
        vectors = components["VectorQuery"]["properties"]["vectors"]
        vectors.update(maxItems=max_queries)
        vectors["items"].update(minItems=dim, maxItems=dim)
        components["IdQuery"]["properties"]["ids"].update(maxItems=max_queries)
        search = schema["paths"]["/search"]
        for parameter in search["get"]["parameters"]:
            if parameter["name"] == "k":
                parameter["schema"].update(k_bounds)
        search["post"]["requestBody"] = {
            "required": True,
            "content": {
                "multipart/form-data": {"schema": {"$ref": "#/components/schemas/ImageUpload"}},
                "application/json": {
                    "schema": {
                        "oneOf": [
                            {"$ref": "#/components/schemas/VectorQuery"},
                            {"$ref": "#/components/schemas/IdQuery"},
                        ]
                    }
                },
            },
        }
        if root_path:
            schema["servers"] = [{"url": root_path}]
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
