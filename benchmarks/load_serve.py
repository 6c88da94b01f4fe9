"""Load and abuse benchmark of `embedpipe serve`, over loopback only (not a test; CPU heavy).

    python benchmarks/load_serve.py [--seconds 4] [--image-size 224] [--half-open 20000] [--big 7000]

It starts real `embedpipe serve` processes (default options) on two indexes it writes
to a temporary directory: a synthetic one of `--ids` seeded 2048-d vectors for id
queries, and a small real one (the bundled sample photos embedded with seeded random
weights at `--image-size`) for image queries. Then it measures, each phase bounded by
`--seconds` and `--max-requests`:

- req/s and p50/p99 latency of id queries and of image queries at concurrency 1, 8, 32;
- the id-query p50 while 32 clients keep image queries in flight;
- the photo server's RSS (before, peak, after; /proc/PID/status VmRSS and VmHWM);
- `--big-count` concurrent queries with a `--big` x `--big` RGBA PNG: statuses, peak RSS
  growth and what stays resident afterwards;
- half-open connections: `--half-open` connections that never finish a request, opened
  from `--half-open-procs` processes (one process may hold at most its open-files limit),
  then an id query's latency and the server's open files and connection counts.

Every socket goes to 127.0.0.1. Prints a Markdown table; `--json FILE` also writes the numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import platform
import re
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

HOLDER = """
import socket, sys
host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
held = []
for i in range(count):
    s = socket.create_connection((host, port), timeout=30)
    if i % 2:
        s.sendall(b"GET /healthz HTTP/1.1\\r\\nHost: x\\r\\n")  # headers that never end
    held.append(s)
print("ready", flush=True)
sys.stdin.readline()
"""


class Server:
    """A running `embedpipe serve` subprocess."""

    def __init__(self, proc: subprocess.Popen, url: str) -> None:
        self.proc = proc
        self.url = url
        self.port = int(url.rsplit(":", 1)[1])

    def mib(self, key: str) -> float:
        for line in pathlib.Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name == key:
                return int(value.split()[0]) / 1024
        raise KeyError(key)

    def reset_peak(self) -> None:
        pathlib.Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")

    def open_files(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))


@contextmanager
def serve(index_dir: str, log: pathlib.Path, *args: str) -> Iterator[Server]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline", "serve", "--index", index_dir, "--port", "0", *args],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env=env,
        )
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 300)
        match = re.search(r"(http://127\.0\.0\.1:\d+)/", proc.stdout.readline() if ready else "")
        if not match:
            raise RuntimeError(f"the server did not start; its log: {log}")
        yield Server(proc, match.group(1))
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def summary(latencies: list[float], statuses: list[int], seconds: float) -> dict:
    ms = sorted(x * 1000 for x in latencies)
    pick = lambda q: round(ms[min(len(ms) - 1, int(q * len(ms)))], 1) if ms else None  # noqa: E731
    return {
        "requests": len(ms),
        "req_per_s": round(len(ms) / seconds, 1) if seconds else None,
        "p50_ms": pick(0.5),
        "p99_ms": pick(0.99),
        "statuses": {str(s): statuses.count(s) for s in sorted(set(statuses))},
    }


async def load(url: str, make_request, concurrency: int, seconds: float, max_requests: int) -> dict:
    """`concurrency` clients sending `make_request(client, i)` until `seconds` pass or `max_requests` are sent."""
    latencies: list[float] = []
    statuses: list[int] = []
    sent = 0
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        end = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal sent
            while time.perf_counter() < end and sent < max_requests:
                sent += 1
                start = time.perf_counter()
                r = await make_request(client, sent)
                latencies.append(time.perf_counter() - start)
                statuses.append(r.status_code)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return summary(latencies, statuses, time.perf_counter() - start)


async def id_under_image_load(url: str, image_request, id_request, seconds: float) -> dict:
    """The id-query latency while 32 clients keep image queries in flight."""
    limits = httpx.Limits(max_connections=40, max_keepalive_connections=40)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        images: list[int] = []
        stop = time.perf_counter() + seconds + 1

        async def image_client() -> None:
            i = 0
            while time.perf_counter() < stop:
                i += 1
                images.append((await image_request(client, i)).status_code)

        tasks = [asyncio.create_task(image_client()) for _ in range(32)]
        await asyncio.sleep(1)
        latencies, statuses = [], []
        while time.perf_counter() < stop:
            start = time.perf_counter()
            r = await id_request(client, len(latencies))
            latencies.append(time.perf_counter() - start)
            statuses.append(r.status_code)
            await asyncio.sleep(0.05)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    out = summary(latencies, statuses, 0)
    out["image_statuses"] = {str(s): images.count(s) for s in sorted(set(images))}
    return out


def half_open(server: Server, total: int, procs: int, id_query: str) -> dict:
    """Hold `total` connections that never finish a request, then time an id query."""
    holders = [
        subprocess.Popen(
            [sys.executable, "-c", HOLDER, "127.0.0.1", str(server.port), str(total // procs)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(procs)
    ]
    try:
        start = time.perf_counter()
        for holder in holders:
            if holder.stdout.readline().strip() != "ready":
                raise RuntimeError("a connection holder failed")
        opened = time.perf_counter() - start
        latencies = []
        for _ in range(5):
            t = time.perf_counter()
            r = httpx.get(f"{server.url}/search", params={"id": id_query, "k": 10}, timeout=30)
            latencies.append(time.perf_counter() - t)
            r.raise_for_status()
        stats = httpx.get(f"{server.url}/stats", timeout=30).json()["connections"]
        return {
            "connections": total // procs * procs,
            "open_seconds": round(opened, 1),
            "id_query_ms": [round(x * 1000, 1) for x in latencies],
            "server_open_files": server.open_files(),
            "server_rss_mib": round(server.mib("VmRSS")),
            **stats,
        }
    finally:
        for holder in holders:
            holder.stdin.close()
            holder.wait(30)


def big_images(server: Server, side: int, count: int) -> dict:
    from index_fixtures import png_bytes
    from PIL import Image

    data = png_bytes(Image.new("RGBA", (side, side), (10, 200, 30, 128)))

    async def run() -> list[int]:
        async with httpx.AsyncClient(base_url=server.url, timeout=600) as client:
            rs = await asyncio.gather(
                *(client.post("/search", files={"image": ("big.png", data)}) for _ in range(count))
            )
            return [r.status_code for r in rs]

    time.sleep(1)
    before = server.mib("VmRSS")
    server.reset_peak()
    start = time.perf_counter()
    statuses = asyncio.run(run())
    took = time.perf_counter() - start
    peak = server.mib("VmHWM")
    time.sleep(2)
    after = server.mib("VmRSS")
    return {
        "png_bytes": len(data),
        "statuses": statuses,
        "seconds": round(took, 1),
        "rss_before_mib": round(before),
        "peak_growth_mib": round(peak - before),
        "held_after_mib": round(after - before),
    }


def image_phases(args: argparse.Namespace, work: pathlib.Path, results: dict) -> None:
    """Image queries, id queries under image load, memory, big PNGs: on a photo index served with its model."""
    from index_fixtures import photo_files, photo_index

    from pipeline.config import ModelConfig

    files = photo_files(work / "photos", max_side=4096)
    photos = photo_index(work / "photo-index", files, ModelConfig(image_size=args.image_size, weights="random"))
    payloads = [(name, pathlib.Path(path).read_bytes()) for name, path in sorted(files.items())]
    names = [name for name, _ in payloads]

    async def by_photo_id(client: httpx.AsyncClient, i: int) -> httpx.Response:
        return await client.get("/search", params={"id": names[i % len(names)], "k": 10})

    async def by_image(client: httpx.AsyncClient, i: int) -> httpx.Response:
        name, data = payloads[i % len(payloads)]
        return await client.post("/search", files={"image": (name, data)}, data={"k": "10"})

    with serve(photos, work / "photos.log") as server:
        results["photo server rss MiB (start)"] = round(server.mib("VmRSS"))
        server.reset_peak()
        for c in (1, 8, 32):
            results[f"image c={c}"] = asyncio.run(load(server.url, by_image, c, args.seconds, args.max_requests))
        results["id p50 under 32 image clients"] = asyncio.run(
            id_under_image_load(server.url, by_image, by_photo_id, args.seconds)
        )
        results["photo server rss MiB (peak, after)"] = (round(server.mib("VmHWM")), round(server.mib("VmRSS")))
        if args.big:
            results[f"{args.big_count} x {args.big}x{args.big} RGBA PNG"] = big_images(server, args.big, args.big_count)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=4, help="length of each load phase")
    p.add_argument("--max-requests", type=int, default=5000, help="most requests per phase")
    p.add_argument("--ids", type=int, default=20000, help="vectors in the synthetic index")
    p.add_argument("--image-size", type=int, default=224, help="model input size of the photo index")
    p.add_argument("--half-open", type=int, default=20000, help="half-open connections (0: skip)")
    p.add_argument("--half-open-procs", type=int, default=4, help="processes holding them")
    p.add_argument("--big", type=int, default=7000, help="side of the big RGBA PNG (0: skip)")
    p.add_argument("--big-count", type=int, default=8, help="concurrent big-PNG queries")
    p.add_argument("--no-images", action="store_true", help="only the id-query phases (no model, no photo index)")
    p.add_argument("--json", help="also write the numbers here")
    args = p.parse_args()

    from index_fixtures import clustered, write_index_dir

    work = pathlib.Path(tempfile.mkdtemp(prefix="embedpipe-load-"))
    results: dict = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}",
        "settings": vars(args),
    }
    try:
        synthetic = write_index_dir(work / "synthetic", clustered(args.ids, 2048))

        async def by_id(client: httpx.AsyncClient, i: int) -> httpx.Response:
            return await client.get("/search", params={"id": f"item-{i % args.ids:05d}", "k": 10})

        with serve(synthetic, work / "synthetic.log") as server:
            for c in (1, 8, 32):
                results[f"id c={c}"] = asyncio.run(load(server.url, by_id, c, args.seconds, args.max_requests))
            results["id server rss MiB"] = round(server.mib("VmRSS"))
            if args.half_open:
                results["half-open"] = half_open(server, args.half_open, args.half_open_procs, "item-00007")
        if not args.no_images:
            image_phases(args, work, results)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"\n{results['machine']}; settings: {json.dumps(results['settings'])}\n")
    print("| case | requests | req/s | p50 ms | p99 ms | statuses |")
    print("|---|---|---|---|---|---|")
    for key, value in results.items():
        if isinstance(value, dict) and "p50_ms" in value:
            statuses = value["statuses"] | {f"image {k}": v for k, v in value.get("image_statuses", {}).items()}
            print(
                f"| {key} | {value['requests']} | {value['req_per_s'] or ''} | {value['p50_ms']} | {value['p99_ms']} "
                f"| {statuses} |"
            )
    print()
    for key, value in results.items():
        if key not in ("machine", "settings") and not (isinstance(value, dict) and "p50_ms" in value):
            print(f"- {key}: {value}")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
