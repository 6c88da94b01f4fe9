"""The server's default limits, importable without FastAPI or uvicorn (the `[serve]` extra).

`embedpipe --help` builds every subcommand's options, `serve`'s too, on an install without that
extra; the arithmetic behind each default is in docs/SERVE.md.
"""

from __future__ import annotations

from pipeline.serve.memory import WORST_BYTES_PER_PIXEL

DEFAULT_MAX_UPLOAD_BYTES = 20 * 2**20
DEFAULT_DECODE_MEMORY_MB = 2048
# The largest image whose worst decode path (WebP with alpha, 36 bytes per pixel: serve/memory.py)
# fits the default decode memory: 50 MP x 36 B = 1.8 GB < 2 GiB. Arithmetic: docs/SERVE.md.
DEFAULT_SERVE_MAX_PIXELS = 50_000_000
DEFAULT_DECODE_WAIT = 30.0
DEFAULT_BODY_TIMEOUT = 60.0
DEFAULT_MAX_K = 1000
DEFAULT_MAX_QUERIES = 64  # vectors or ids in one JSON query on POST /search
DEFAULT_MAX_CONNECTIONS = 1000
DEFAULT_HEADER_TIMEOUT = 10.0
DEFAULT_KEEP_ALIVE_TIMEOUT = 5.0


def worst_decode_bytes(max_pixels: int) -> int:
    """The memory one decode of the largest allowed image can take (the worst decode path)."""
    return max_pixels * WORST_BYTES_PER_PIXEL
