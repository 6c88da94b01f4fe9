"""The API's errors: an exception answered as JSON, the k check every search shares, and their OpenAPI entries."""

from __future__ import annotations

from pipeline.serve.models import ErrorBody

_DESCRIPTIONS = {
    400: "the image is empty, cut short or does not decode",
    404: "unknown id, or no thumbnail stored",
    408: "the request body did not arrive within --body-timeout",
    409: "this index cannot answer this kind of query",
    413: "the body or the image is over a limit",
    415: "the upload is not an image",
    422: "invalid request: k out of range, bad vectors, too many queries, missing fields",
    503: "the server is busy or the model is unavailable; retry",
}


class ApiError(Exception):
    """An error answered as JSON {"error": code, "detail": message} with `status` (and extra `headers`)."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.headers = headers


def check_k(k: int, max_k: int) -> int:
    """`k` if it is in 1..max_k, else ApiError 422 k_out_of_range."""
    if not 1 <= k <= max_k:
        raise ApiError(422, "k_out_of_range", f"k must be between 1 and {max_k}; got {k}")
    return k


def error_responses(*statuses: int) -> dict:
    """FastAPI `responses=` documenting these error statuses with the JSON error body."""
    return {status: {"model": ErrorBody, "description": _DESCRIPTIONS[status]} for status in statuses}
