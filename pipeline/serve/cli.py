"""`embedpipe serve`: open an index, build the query model, serve the API and page with uvicorn."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import socket
import sys

from pipeline.errors import UnavailableError, UsageError
from pipeline.options.embedding import add_size_limits
from pipeline.options.indexing import add_index_dir_option
from pipeline.options.runner import use_filesystem_options
from pipeline.serve.limits import (
    DEFAULT_BODY_TIMEOUT,
    DEFAULT_DECODE_MEMORY_MB,
    DEFAULT_DECODE_WAIT,
    DEFAULT_HEADER_TIMEOUT,
    DEFAULT_KEEP_ALIVE_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_K,
    DEFAULT_MAX_QUERIES,
    DEFAULT_SERVE_MAX_PIXELS,
    worst_decode_bytes,
)

log = logging.getLogger(__name__)


def add_serve_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `serve` subcommand (func=cmd_serve) to the `embedpipe` parser."""
    p = subparsers.add_parser(
        "serve",
        help="HTTP API and results page over an index",
        description="Serve an index directory over HTTP: GET /search?id=..&k=.., POST /search (an image upload, or "
        "JSON with several vectors or ids), GET /thumbnail/ID, /stats, /healthz, /metrics (Prometheus), "
        "/openapi.json, and a results page at /. There is no authentication: it binds to 127.0.0.1 unless "
        "--host says otherwise (see docs/SERVE.md).",
    )
    add_index_dir_option(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--max-upload-mb", type=float, default=20, help="largest image upload in MiB (default 20)")
    add_size_limits(p, what="query image", then="are refused", max_pixels=DEFAULT_SERVE_MAX_PIXELS, files=False)
    p.add_argument(
        "--max-k", type=int, default=DEFAULT_MAX_K, help=f"most neighbours per query (default {DEFAULT_MAX_K})"
    )
    p.add_argument(
        "--decode-memory-mb",
        type=float,
        default=DEFAULT_DECODE_MEMORY_MB,
        help="memory in MiB that all concurrent query-image decodes may use together, estimated from each image's "
        f"header; other image queries wait for it (default {DEFAULT_DECODE_MEMORY_MB})",
    )
    p.add_argument(
        "--decode-wait",
        type=float,
        default=DEFAULT_DECODE_WAIT,
        help=f"seconds an image query waits for decode memory before a 503 (default {DEFAULT_DECODE_WAIT:g})",
    )
    p.add_argument(
        "--max-connections",
        type=int,
        default=DEFAULT_MAX_CONNECTIONS,
        help="most open client connections; above it the connections idle the longest are closed to let new "
        f"ones in (default {DEFAULT_MAX_CONNECTIONS}, lowered to fit the open-files limit)",
    )
    p.add_argument(
        "--header-timeout",
        type=float,
        default=DEFAULT_HEADER_TIMEOUT,
        help="seconds a connection has to send complete request headers, from connecting or from its last "
        f"response (default {DEFAULT_HEADER_TIMEOUT:g})",
    )
    p.add_argument(
        "--body-timeout",
        type=float,
        default=DEFAULT_BODY_TIMEOUT,
        help="seconds the whole request body (an upload) may take to arrive; 408 after "
        f"(default {DEFAULT_BODY_TIMEOUT:g})",
    )
    p.add_argument(
        "--max-queries",
        type=int,
        default=DEFAULT_MAX_QUERIES,
        help=f"most vectors or ids in one JSON query on POST /search (default {DEFAULT_MAX_QUERIES})",
    )
    p.add_argument(
        "--cors-origins",
        metavar="ORIGIN[,ORIGIN]",
        help="let web pages from these origins (scheme://host[:port], or *) call the API from a browser; "
        "default: no CORS headers, so only pages served by this server can",
    )
    p.add_argument(
        "--root-path",
        default="",
        metavar="PREFIX",
        help="the path prefix a reverse proxy serves the API under (e.g. /embedpipe), named in /openapi.json's "
        "servers; the page and the links in results are relative and work under any prefix without it",
    )
    p.add_argument(
        "--report-root",
        default=None,
        metavar="ROOT",
        help="nightly root whose newest report.html /report shows (default: the run the index belongs to)",
    )
    p.add_argument(
        "--duplicates",
        default=None,
        metavar="FILE",
        help="groups Parquet written by `embedpipe duplicates`, shown at /duplicates",
    )
    p.set_defaults(func=cmd_serve)
    return p


def _bind(host: str, port: int, backlog: int = 128) -> socket.socket:
    """A listening socket, bound before uvicorn starts so that --port 0 can report the port it got."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    sock.listen(backlog)
    return sock


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _check_args(args: argparse.Namespace) -> None:
    """UsageError naming every limit that is not positive, or a --root-path that is not a path."""
    positive = {
        "--max-upload-mb": args.max_upload_mb,
        "--max-pixels": args.max_pixels,
        "--max-k": args.max_k,
        "--decode-memory-mb": args.decode_memory_mb,
        "--decode-wait": args.decode_wait,
        "--max-connections": args.max_connections,
        "--header-timeout": args.header_timeout,
        "--body-timeout": args.body_timeout,
        "--max-queries": args.max_queries,
    }
    bad = [f"{name} {value:g}" for name, value in positive.items() if not value > 0]
    if bad:
        raise UsageError(f"{', '.join(bad)}: must be positive")
    if args.root_path and (not args.root_path.startswith("/") or any(c in args.root_path for c in "?# ")):
        raise UsageError(f"--root-path {args.root_path!r}: must be a path that starts with /, e.g. /embedpipe")


def cmd_serve(args: argparse.Namespace, beam_args: list[str]) -> None:
    """Run the server until interrupted; what stops it from starting raises (UsageError and kin)."""
    from pipeline.index.search import ModelMismatchError, Searcher

    try:
        from pipeline.serve.app import create_app
        from pipeline.serve.connections import ConnectionGuard, build_server, plan_connections, raise_fd_limit
    except ImportError as exc:  # FastAPI / uvicorn are the [serve] extra
        raise UnavailableError(
            f"the HTTP server needs the serve extra ({exc.name} is not installed): pip install 'embedpipe[serve]'"
        ) from exc

    from pipeline.serve.cors import parse_origins

    _check_args(args)
    cors_origins = parse_origins(args.cors_origins) if args.cors_origins is not None else None
    decode_memory = int(args.decode_memory_mb * 2**20)
    worst = worst_decode_bytes(args.max_pixels)
    if worst > decode_memory:
        log.warning(
            "--max-pixels %d allows images that take up to %.0f MiB to decode, more than --decode-memory-mb %g: "
            "such an image decodes alone and can exceed the budget; lower --max-pixels or raise --decode-memory-mb",
            args.max_pixels,
            worst / 2**20,
            args.decode_memory_mb,
        )
    fd_limit = raise_fd_limit()
    max_connections, backlog = plan_connections(args.max_connections, fd_limit)
    if max_connections < args.max_connections:
        log.warning(
            "--max-connections %d lowered to %d to fit the open-files limit of %d (ulimit -n)",
            args.max_connections,
            max_connections,
            fd_limit,
        )
    use_filesystem_options(beam_args)  # credentials and settings of remote filesystems
    searcher = Searcher.open(args.index, max_pixels=args.max_pixels)
    try:
        # Build the model now: the first upload should not wait for it.
        searcher.warm()
    except ModelMismatchError as exc:
        log.warning("image search is unavailable (search by id still works): %s", exc)
    except RuntimeError as exc:  # weights not loadable here; id search still works
        log.warning("image search is unavailable: %s", exc)
    try:
        sock = _bind(args.host, args.port, backlog)
    except OSError as exc:
        searcher.close()
        raise UsageError(f"cannot listen on {args.host}:{args.port}: {exc}") from exc
    guard = ConnectionGuard(max_connections, args.header_timeout)
    app = create_app(
        searcher,
        max_upload_bytes=int(args.max_upload_mb * 2**20),
        max_pixels=args.max_pixels,
        max_k=args.max_k,
        decode_memory_bytes=decode_memory,
        decode_wait=args.decode_wait,
        body_timeout=args.body_timeout,
        connection_stats=guard.stats,
        report_root=args.report_root,
        duplicates=args.duplicates,
        max_queries=args.max_queries,
        cors_origins=cors_origins,
        root_path=args.root_path.rstrip("/"),
    )
    server = build_server(app, guard, keep_alive_timeout=DEFAULT_KEEP_ALIVE_TIMEOUT, backlog=backlog)
    host, port = sock.getsockname()[:2]
    if not _is_loopback(host):
        log.warning(
            "listening on %s, reachable from other machines: there is no authentication, so anyone who can "
            "reach it can query the index and read every id, uri and thumbnail",
            host,
        )
    shown = f"[{host}]" if ":" in host else host
    print(f"embedpipe serve: http://{shown}:{port}/  ({searcher.ntotal} vectors from {args.index})", flush=True)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        # uvicorn shuts down gracefully on Ctrl-C, then re-raises it: that is a normal stop.
        print("embedpipe serve: stopped", file=sys.stderr)
    finally:
        sock.close()
        searcher.close()
