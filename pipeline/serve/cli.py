"""`embedpipe serve`: open an index, build the query model, serve the API and page with uvicorn."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import socket
import sys

from pipeline.serve.app import DEFAULT_MAX_K, DEFAULT_SERVE_MAX_PIXELS

log = logging.getLogger(__name__)


def add_serve_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `serve` subcommand (func=cmd_serve) to the `embedpipe` parser."""
    p = subparsers.add_parser(
        "serve",
        help="HTTP API and results page over an index",
        description="Serve an index directory over HTTP: GET /search?id=..&k=.., POST /search (image upload), "
        "GET /thumbnail/ID, /stats, /healthz, and a results page at /. There is no authentication: "
        "it binds to 127.0.0.1 unless --host says otherwise (see docs/SERVE.md).",
    )
    p.add_argument("--index", required=True, metavar="DIR", help="index directory (local, gs://, s3://)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--max-upload-mb", type=float, default=20, help="largest image upload in MiB (default 20)")
    p.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_SERVE_MAX_PIXELS,
        help=f"largest query image in pixels, width x height (default {DEFAULT_SERVE_MAX_PIXELS:,})",
    )
    p.add_argument(
        "--max-k", type=int, default=DEFAULT_MAX_K, help=f"most neighbours per query (default {DEFAULT_MAX_K})"
    )
    p.set_defaults(func=cmd_serve)
    return p


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket, bound before uvicorn starts so that --port 0 can report the port it got."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    sock.listen(128)
    return sock


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def cmd_serve(args: argparse.Namespace, beam_args: list[str]) -> int:
    """Run the server until interrupted; errors before it starts: one line on stderr, exit code 2."""
    import uvicorn
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipeline.index.search import ModelMismatchError, Searcher
    from pipeline.serve.app import create_app

    if args.max_upload_mb <= 0 or args.max_pixels < 1 or args.max_k < 1:
        print("embedpipe serve: error: --max-upload-mb, --max-pixels and --max-k must be positive", file=sys.stderr)
        return 2
    if beam_args:
        FileSystems.set_options(PipelineOptions(beam_args))  # credentials/settings of remote filesystems
    try:
        searcher = Searcher.open(args.index, max_pixels=args.max_pixels)
    except ValueError as exc:
        print(f"embedpipe serve: error: {exc}", file=sys.stderr)
        return 2
    try:
        # Build the model now: the first upload should not wait for it.
        searcher.warm()
    except ModelMismatchError as exc:
        log.warning("image search is unavailable (search by id still works): %s", exc)
    except RuntimeError as exc:  # weights not loadable here; id search still works
        log.warning("image search is unavailable: %s", exc)
    app = create_app(
        searcher, max_upload_bytes=int(args.max_upload_mb * 2**20), max_pixels=args.max_pixels, max_k=args.max_k
    )
    try:
        sock = _bind(args.host, args.port)
    except OSError as exc:
        print(f"embedpipe serve: error: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        searcher.close()
        return 2
    host, port = sock.getsockname()[:2]
    if not _is_loopback(host):
        log.warning(
            "listening on %s, reachable from other machines: there is no authentication, so anyone who can "
            "reach it can query the index and read every id, uri and thumbnail",
            host,
        )
    shown = f"[{host}]" if ":" in host else host
    print(f"embedpipe serve: http://{shown}:{port}/  ({searcher.ntotal} vectors from {args.index})", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=5))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        # uvicorn shuts down gracefully on Ctrl-C, then re-raises it: that is a normal stop.
        print("embedpipe serve: stopped", file=sys.stderr)
    finally:
        sock.close()
        searcher.close()
    return 0
