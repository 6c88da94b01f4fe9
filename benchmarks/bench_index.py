"""Benchmark the index types on seeded, clustered 2048-d vectors (not a test; CPU heavy).

    python benchmarks/bench_index.py --n 100000 [--n 1000000] --dim 2048

For each N it writes a real embeddings dataset (Parquet), runs `build_index` for each index type
(the same code as `embedpipe index`, so build seconds include the sample pass, training, adding,
the exact ground truth and the nprobe/efSearch tuning), then loads index.faiss and measures:
queries/s for one batch of 1,000 queries and for queries sent one at a time, and recall@10
against exact search for *new* vectors from the same distribution (not in the index).

Memory: the dataset is generated and written in chunks; each index is freed before the next is
built, and the exact reference (the flat index's answer, or a streamed brute-force pass over the
Parquet files when flat is not run) never holds the vectors twice. The flat and IVF-Flat indexes
still hold N x dim x 4 bytes each (8.2 GB at 1M x 2048), one at a time. The peak RSS of each
type's build + measurement is printed (VmHWM, reset before each type through /proc/self/clear_refs).

For 1M vectors, keep the dataset (`--data DIR`) so a later run of other types reuses it and the
exact answer saved beside it; HNSW is skipped above `--hnsw-max-n` (default 200,000): at 1M x 2048
on 2 cores it would add an estimated ~17 min and an 8.5 GB index to a run that already takes ~45:

    MALLOC_MMAP_THRESHOLD_=1048576 python benchmarks/bench_index.py --n 1000000 \
        --types flat,ivf-sq8,ivf-flat,ivf-pq,hnsw --single 100 --data /tmp/bench1m --json bench1m.json

(MALLOC_MMAP_THRESHOLD_: glibc serves allocations above 1 MiB, such as FAISS's inverted lists,
with their own mappings, so a list's unused capacity is never resident and a freed index goes
back to the system at once instead of staying in the heap.)
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import IndexConfig
from pipeline.index.build import ExactNeighbours, build_index
from pipeline.index.io import iter_batches, scan_dataset
from pipeline.index.loading import drop_precomputed_table
from pipeline.records import embeddings_schema
from pipeline.storage import write_json_atomic as write_json

TYPES = ("flat", "ivf-flat", "ivf-sq8", "ivf-pq", "hnsw")
MODEL = "bench/synthetic-clustered"
# HNSW32 at 100k x 2048 built in 83 s here (docs/BENCHMARKS-index.md); insertion cost grows
# about n log n and, past the CPU caches, each distance is a random 8 kB read: ~15-25 min at 1M.
HNSW_100K_SECONDS = 83


def peak_rss_reset() -> None:
    """Start a new peak: VmHWM is reset to the current RSS (Linux >= 4.0)."""
    _PEAKS.append(peak_rss())
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss() -> int:
    """Peak resident set size in bytes since the last reset (VmHWM), else since the start."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


_PEAKS: list[int] = []  # peaks of the phases before each reset


def peak_rss_total() -> int:
    """Peak RSS of the whole run: the largest phase peak (clear_refs resets getrusage's maximum too)."""
    return max([*_PEAKS, peak_rss()])


def log(message: str) -> None:
    print(f"# {time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


class Generator:
    """Seeded vectors with the low intrinsic dimension of image embeddings: clusters in a 64-d
    latent space, mapped linearly to `dim` dimensions, plus a little isotropic noise."""

    def __init__(self, dim: int, *, seed: int, clusters: int = 1000, latent: int = 64) -> None:
        rng = np.random.default_rng(seed)
        self.dim = dim
        self.centers = rng.normal(size=(clusters, latent)).astype(np.float32)
        self.mix = (rng.normal(size=(latent, dim)) / np.sqrt(latent)).astype(np.float32)
        self.scales = rng.uniform(0.2, 0.6, size=clusters).astype(np.float32)  # clusters of varied spread

    def sample(self, n: int, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        which = rng.integers(0, len(self.centers), n)
        z = self.centers[which] + self.scales[which, None] * rng.standard_normal((n, self.mix.shape[0]), np.float32)
        return z @ self.mix + np.float32(0.05) * rng.standard_normal((n, self.dim), np.float32)


def write_dataset(root: str, gen: Generator, n: int, *, seed: int, rows_per_file: int = 50_000) -> None:
    """OUTPUT/embeddings/part-*.parquet + manifest.json, one chunk in memory at a time."""
    os.makedirs(f"{root}/embeddings", exist_ok=True)
    schema = embeddings_schema(gen.dim)
    stamp = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)
    files = (n + rows_per_file - 1) // rows_per_file
    for f in range(files):
        a, b = f * rows_per_file, min(n, (f + 1) * rows_per_file)
        x = gen.sample(b - a, seed=seed * 100_003 + f)
        ids = [f"img-{i:09d}" for i in range(a, b)]
        columns = {
            "id": ids,
            "uri": [f"gs://bench/{i}.jpg" for i in ids],
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), gen.dim),
            "content_sha256": ["0" * 64] * (b - a),
            "width": pa.array([640] * (b - a), pa.int32()),
            "height": pa.array([480] * (b - a), pa.int32()),
            "model": [MODEL] * (b - a),
            "embedded_at": pa.array([stamp] * (b - a), pa.timestamp("us", tz="UTC")),
        }
        for field in schema:  # optional columns of the schema (e.g. source_marker): null here
            if field.name not in columns and field.nullable:
                columns[field.name] = pa.nulls(b - a, field.type)
        table = pa.table(columns, schema=schema)
        pq.write_table(table, f"{root}/embeddings/part-{f:05d}-of-{files:05d}.parquet", row_group_size=8192)
    write_json(f"{root}/manifest.json", {"model": MODEL, "model_config": None, "embedding_dim": gen.dim})


def measure(index_dir: str, queries: np.ndarray, truth: np.ndarray | None, single: int) -> dict:
    """qps (batch and one at a time) and recall@10 of the index as stored (its tuned parameters)."""
    index = faiss.read_index(f"{index_dir}/index.faiss")
    drop_precomputed_table(index)  # as Searcher.open does
    single = min(single, len(queries))
    index.search(queries[:10], 10)  # warm-up
    t = time.perf_counter()
    _, found = index.search(queries, 10)
    batch_qps = len(queries) / (time.perf_counter() - t)
    t = time.perf_counter()
    for q in queries[:single]:
        index.search(q[None, :], 10)
    single_qps = single / (time.perf_counter() - t)
    del index  # freed before the next index is built
    recall = None
    if truth is not None:
        recall = float(np.mean([len(set(f) & set(g)) / 10 for f, g in zip(found, truth)]))
    return {
        "batch_qps": batch_qps,
        "single_qps": single_qps,
        "single_queries": single,
        "recall": recall,
        "found": found,
    }


def exact_by_streaming(data: str, queries: np.ndarray, k: int = 10) -> np.ndarray:
    """Exact top-k labels of the queries by brute force over the Parquet files, one batch at a time."""
    ds = scan_dataset(data)
    heap = ExactNeighbours(queries, k, faiss.METRIC_INNER_PRODUCT)
    for shard in ds.shards:
        for start, x, _ in iter_batches(shard, ds.dim, 8192):
            faiss.normalize_L2(x)
            heap.add(x, shard.offset + start)
    return heap.result()[1]


def dataset_ready(root: str, n: int, dim: int, seed: int) -> bool:
    try:
        with open(f"{root}/bench.json") as f:
            return json.load(f) == {"n": n, "dim": dim, "seed": seed}
    except (OSError, ValueError):
        return False


def hnsw_skip_reason(n: int, dim: int, cap: int) -> str | None:
    if n <= cap:
        return None
    minutes = HNSW_100K_SECONDS * (n / 100_000) * (np.log(n) / np.log(100_000)) * (dim / 2048) / 60
    return (
        f"skipped: N > --hnsw-max-n {cap:,}; HNSW32 insertion of {n:,} x {dim} on this machine is estimated "
        f"at ~{minutes:.0f} min (100k took {HNSW_100K_SECONDS} s, cost ~ n log n), over the run's time cap"
    )


def run(n: int, args: argparse.Namespace) -> list[dict]:
    work = tempfile.mkdtemp(prefix="bench-index-", dir=args.workdir)
    data = args.data or f"{work}/data"
    try:
        gen = Generator(args.dim, seed=args.seed)
        if not dataset_ready(data, n, args.dim, args.seed):
            t = time.perf_counter()
            write_dataset(data, gen, n, seed=args.seed)
            write_json(f"{data}/bench.json", {"n": n, "dim": args.dim, "seed": args.seed})
            log(f"N={n:,}: dataset written in {time.perf_counter() - t:.0f}s")
        else:
            log(f"N={n:,}: reusing the dataset in {data}")
        queries = gen.sample(args.queries, seed=args.seed + 999_983)  # new vectors, not in the index
        faiss.normalize_L2(queries)  # cosine, as the index builds by default
        truth_file, flat_file = f"{data}/truth-{args.queries}.npy", f"{data}/flat-row.json"
        truth = np.load(truth_file) if os.path.exists(truth_file) else None
        results = []
        if "flat" not in args.types and os.path.exists(flat_file):
            with open(flat_file) as f:
                results.append({**json.load(f), "earlier": True})  # exact reference of an earlier run
        for kind in args.types:
            skip = hnsw_skip_reason(n, args.dim, args.hnsw_max_n) if kind == "hnsw" else None
            if skip:
                log(f"{kind}: {skip}")
                results.append({"n": n, "type": kind, "skipped": skip})
                continue
            if truth is None and kind != "flat":
                t = time.perf_counter()
                truth = exact_by_streaming(data, queries)
                np.save(truth_file, truth)
                log(f"exact top-10 of the queries streamed from Parquet in {time.perf_counter() - t:.0f}s")
            peak_rss_reset()
            t = time.perf_counter()
            log(f"{kind}: building")
            meta = build_index(data, f"{work}/{kind}", IndexConfig(index_type=kind, memory_budget=args.memory_budget))
            build_rss = peak_rss()
            log(f"{kind}: built in {time.perf_counter() - t:.0f}s, peak RSS {build_rss / 2**30:.2f} GiB")
            single = args.single_exact if kind == "flat" else args.single
            got = measure(f"{work}/{kind}", queries, truth, single)
            if kind == "flat":
                truth, got["recall"] = got["found"], 1.0  # exact search is the reference
                np.save(truth_file, truth)
            row = {"n": n, "type": kind, **meta, **got, "build_peak_rss": build_rss, "peak_rss": peak_rss()}
            if kind == "flat":
                with open(flat_file, "w") as f:
                    json.dump({k: v for k, v in row.items() if k != "found"}, f)
            log(
                f"{kind}: batch {got['batch_qps']:,.0f} q/s, single {got['single_qps']:,.0f} q/s, recall@10 "
                f"{got['recall']}, peak RSS {row['peak_rss'] / 2**30:.2f} GiB"
            )
            results.append(row)
            shutil.rmtree(f"{work}/{kind}")
        return results
    finally:
        shutil.rmtree(work, ignore_errors=True)


def table(rows: list[dict], out: Callable[[str], None] = print) -> None:
    out(
        "| N | index | factory | search params | build s | index bytes | batch q/s | x exact | "
        "single q/s | x exact | recall@10 (new queries) | recall@10 (index.json) | peak RSS |"
    )
    out("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if "skipped" in r:
            out(f"| {r['n']:,} | {r['type']} | - | - | - | - | - | - | - | - | - | - | - ({r['skipped']}) |")
            continue
        exact = next((e for e in rows if e["n"] == r["n"] and e["type"] == "flat"), r)
        params = ", ".join(f"{k}={v}" for k, v in r["search_params"].items()) or "-"
        recall = f"{r['recall']:.3f}" if r["recall"] is not None else "n/a"
        out(
            f"| {r['n']:,} | {r['type']} | `{r['factory']}` | {params} | {r['build_seconds']:.1f} | "
            f"{r['bytes'] / 1e6:,.1f} MB | {r['batch_qps']:,.0f} | {r['batch_qps'] / exact['batch_qps']:.1f} | "
            f"{r['single_qps']:,.0f} | {r['single_qps'] / exact['single_qps']:.1f} | {recall} | "
            f"{r['recall_at_10']:.3f} | {r['peak_rss'] / 2**30:.2f} GiB |"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, action="append", help="corpus size (repeatable; default 100000)")
    p.add_argument("--dim", type=int, default=2048, help="vector dimension (default 2048)")
    p.add_argument("--types", default=",".join(TYPES), help=f"comma-separated index types (default {','.join(TYPES)})")
    p.add_argument("--queries", type=int, default=1000, help="queries in the batch (default 1000)")
    p.add_argument("--single", type=int, default=200, help="queries sent one at a time (default 200)")
    p.add_argument(
        "--single-exact", type=int, default=20, help="flat: queries one at a time (each scans all; default 20)"
    )
    p.add_argument("--hnsw-max-n", type=int, default=200_000, help="skip HNSW above this N (default 200000)")
    p.add_argument("--data", help="keep the dataset (and the exact answers) here and reuse them (one N only)")
    p.add_argument("--memory-budget", default="4GB", help="passed to build_index (sizes the PQ codes; default 4GB)")
    p.add_argument("--seed", type=int, default=0, help="data seed (default 0)")
    p.add_argument("--workdir", default=None, help="scratch directory (default: system temp)")
    p.add_argument("--json", help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    args.types = [t for t in args.types.split(",") if t]
    if "flat" in args.types:
        args.types = ["flat", *[t for t in args.types if t != "flat"]]  # the exact reference first
    logging.basicConfig(level=logging.INFO, format="# %(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.data and len(args.n or []) > 1:
        p.error("--data takes one --n")
    started = time.perf_counter()
    rows = []
    for n in args.n or [100_000]:
        rows += run(n, args)
    print(f"\nfaiss {faiss.__version__}, {os.cpu_count()} CPU(s), {platform.processor() or platform.machine()}, "
          f"dim {args.dim}, cosine, {args.queries} batch queries, {args.single} one-at-a-time "
          f"({args.single_exact} for flat); {(time.perf_counter() - started) / 60:.1f} min wall, "
          f"peak RSS of the process {peak_rss_total() / 2**30:.2f} GiB\n")  # fmt: skip
    table(rows)
    if args.json:
        with open(args.json, "w") as out:
            json.dump([{k: v for k, v in r.items() if k != "found"} for r in rows], out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
