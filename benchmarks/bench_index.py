"""Benchmark the index types on seeded, clustered 2048-d vectors (not a test; CPU heavy).

    python benchmarks/bench_index.py --n 100000 [--n 1000000] --dim 2048

For each N it writes a real embeddings dataset (Parquet), runs `build_index` for each index type
(the same code as `embedpipe index`, so build seconds include the sample pass, training, adding,
the exact ground truth and the nprobe/efSearch tuning), then loads index.faiss and measures:
queries/s for one batch of 1,000 queries and for queries sent one at a time, and recall@10
against exact search for *new* vectors from the same distribution (not in the index).

Memory: the dataset is generated and written in chunks, but the flat index holds N x dim x 4
bytes (8 GB at 1M x 2048), and an IVF-Flat build the same again.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.index.build import build_index
from pipeline.index.io import write_json
from pipeline.records import embeddings_schema

TYPES = ("flat", "ivf-flat", "ivf-sq8", "ivf-pq", "hnsw")
MODEL = "bench/synthetic-clustered"


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
        table = pa.table(
            {
                "id": ids,
                "uri": [f"gs://bench/{i}.jpg" for i in ids],
                "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), gen.dim),
                "content_sha256": ["0" * 64] * (b - a),
                "width": pa.array([640] * (b - a), pa.int32()),
                "height": pa.array([480] * (b - a), pa.int32()),
                "model": [MODEL] * (b - a),
                "embedded_at": pa.array([stamp] * (b - a), pa.timestamp("us", tz="UTC")),
            },
            schema=schema,
        )
        pq.write_table(table, f"{root}/embeddings/part-{f:05d}-of-{files:05d}.parquet", row_group_size=8192)
    write_json(f"{root}/manifest.json", {"model": MODEL, "model_config": None, "embedding_dim": gen.dim})


def measure(index_dir: str, queries: np.ndarray, truth: np.ndarray | None, single: int) -> dict:
    """qps (batch and one at a time) and recall@10 of the index as stored (its tuned parameters)."""
    index = faiss.read_index(f"{index_dir}/index.faiss")
    index.search(queries[:10], 10)  # warm-up
    t = time.perf_counter()
    _, found = index.search(queries, 10)
    batch_qps = len(queries) / (time.perf_counter() - t)
    t = time.perf_counter()
    for q in queries[:single]:
        index.search(q[None, :], 10)
    single_qps = single / (time.perf_counter() - t)
    recall = None
    if truth is not None:
        recall = float(np.mean([len(set(f) & set(g)) / 10 for f, g in zip(found, truth)]))
    return {"batch_qps": batch_qps, "single_qps": single_qps, "recall": recall, "found": found}


def run(n: int, args: argparse.Namespace) -> list[dict]:
    work = tempfile.mkdtemp(prefix="bench-index-", dir=args.workdir)
    try:
        gen = Generator(args.dim, seed=args.seed)
        t = time.perf_counter()
        write_dataset(f"{work}/data", gen, n, seed=args.seed)
        print(f"# N={n:,}: dataset written in {time.perf_counter() - t:.0f}s", file=sys.stderr, flush=True)
        queries = gen.sample(args.queries, seed=args.seed + 999_983)  # new vectors, not in the index
        faiss.normalize_L2(queries)  # cosine, as the index builds by default
        results, truth = [], None
        for kind in args.types:
            t = time.perf_counter()
            meta = build_index(f"{work}/data", f"{work}/{kind}", index=kind, memory_budget=args.memory_budget)
            print(f"# {kind}: built in {time.perf_counter() - t:.0f}s", file=sys.stderr, flush=True)
            got = measure(f"{work}/{kind}", queries, truth, args.single)
            if kind == "flat":
                truth, got["recall"] = got["found"], 1.0  # exact search is the reference
            results.append({"n": n, "type": kind, **meta, **got})
            shutil.rmtree(f"{work}/{kind}")
        return results
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, action="append", help="corpus size (repeatable; default 100000)")
    p.add_argument("--dim", type=int, default=2048, help="vector dimension (default 2048)")
    p.add_argument("--types", default=",".join(TYPES), help=f"comma-separated index types (default {','.join(TYPES)})")
    p.add_argument("--queries", type=int, default=1000, help="queries in the batch (default 1000)")
    p.add_argument("--single", type=int, default=200, help="queries sent one at a time (default 200)")
    p.add_argument("--memory-budget", default="4GB", help="passed to build_index (sizes the PQ codes; default 4GB)")
    p.add_argument("--seed", type=int, default=0, help="data seed (default 0)")
    p.add_argument("--workdir", default=None, help="scratch directory (default: system temp)")
    p.add_argument("--json", help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    args.types = [t for t in args.types.split(",") if t]
    if "flat" in args.types:
        args.types = ["flat", *[t for t in args.types if t != "flat"]]  # the exact reference first
    rows = []
    for n in args.n or [100_000]:
        rows += run(n, args)
    print(f"\nfaiss {faiss.__version__}, {os.cpu_count()} CPU(s), {platform.processor() or platform.machine()}, "
          f"dim {args.dim}, cosine, {args.queries} batch queries, {args.single} one-at-a-time\n")  # fmt: skip
    print("| N | index | factory | search params | build s | index bytes | batch q/s | x exact | "
          "single q/s | x exact | recall@10 (new queries) | recall@10 (index.json) |")  # fmt: skip
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        exact = next(e for e in rows if e["n"] == r["n"] and e["type"] == "flat") if "flat" in args.types else r
        params = ", ".join(f"{k}={v}" for k, v in r["search_params"].items()) or "-"
        recall = f"{r['recall']:.3f}" if r["recall"] is not None else "n/a"
        print(
            f"| {r['n']:,} | {r['type']} | `{r['factory']}` | {params} | {r['build_seconds']:.1f} | "
            f"{r['bytes'] / 1e6:,.1f} MB | {r['batch_qps']:,.0f} | {r['batch_qps'] / exact['batch_qps']:.1f} | "
            f"{r['single_qps']:,.0f} | {r['single_qps'] / exact['single_qps']:.1f} | {recall} | "
            f"{r['recall_at_10']:.3f} |"
        )
    if args.json:
        with open(args.json, "w") as out:
            json.dump([{k: v for k, v in r.items() if k != "found"} for r in rows], out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
