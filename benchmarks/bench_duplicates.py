"""Benchmark `embedpipe duplicates` on seeded, clustered 2048-d vectors with planted near-duplicate
groups (not a test; CPU heavy).

    python benchmarks/bench_duplicates.py --n 100000 [--n 1000000] [--index ivf-sq8] [--json out.json]

For each N the corpus is generated a chunk at a time (bench_index.Generator: clusters in a 64-d
latent space mapped to 2048 dims, like image embeddings) and in every chunk 0.5% of the rows become
sources of planted groups of 2 to 6 images: noisy copies at 1 - cos between ~5e-6 and ~2e-3 (the
range of re-encodes and resizes measured on real photos). The IVF index is built with FAISS directly
(nlist = 2 sqrt(N), trained on 32 points per list): building it the `embedpipe index` way would take
longer than what is measured here. Not timed.

The index type is the one `--index-type auto` picks for N at the default 4GB budget (IVF-Flat at 100k,
IVF-SQ8 at 1M). Then `find_duplicates` runs on the index directory in a fresh process, with --auto
and with the threshold fixed at cos 0.99, and the table shows its wall time and peak RSS (VmHWM of
that process: the index, memory-mapped, is part of it), the groups found, the recall of
planted pairs (a planted pair counts when both images land in the same group) and the purity
(found groups whose images all come from one planted group).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_index import Generator, log

from pipeline.index.auto import choose_index

CHUNK = 50_000
PLANTED_SHARE = 0.005


def plant(x: np.ndarray, rng: np.random.Generator, first_label: int) -> list[list[int]]:
    """Overwrite rows of a chunk with noisy copies of other rows; returns the planted groups (labels)."""
    n = len(x)
    sources = rng.choice(n, size=max(1, int(n * PLANTED_SHARE)), replace=False)
    free = np.setdiff1d(np.arange(n), sources)
    rng.shuffle(free)
    groups, used = [], 0
    for source in sources:
        size = int(rng.integers(2, 7))
        copies = free[used : used + size - 1]
        used += len(copies)
        norm = np.linalg.norm(x[source])
        for row in copies:
            relative = 10 ** rng.uniform(-2.5, -1.2)  # |noise| / |x|: 1 - cos ~ relative^2 / 2
            noise = rng.standard_normal(x.shape[1]).astype(np.float32)
            x[row] = x[source] + noise * (relative * norm / np.linalg.norm(noise))
        groups.append([first_label + int(source), *(first_label + int(r) for r in copies)])
    return groups


def build(n: int, dim: int, index_type: str, out: str, seed: int) -> list[list[int]]:
    """Write OUT/{index.faiss, ids.parquet, index.json}; returns the planted groups."""
    gen = Generator(dim, seed=seed)
    if index_type == "auto":
        index_type = choose_index(n, dim, 4 * 10**9)[0]
    nlist = int(2 * math.sqrt(n))
    train = gen.sample(min(n, 32 * nlist), seed=seed + 7)
    faiss.normalize_L2(train)
    factory = f"IVF{nlist},{'SQ8' if index_type == 'ivf-sq8' else 'Flat'}"
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    started = time.perf_counter()
    index.train(train)
    log(f"n={n:,}: trained {factory} in {time.perf_counter() - started:.0f}s")
    groups: list[list[int]] = []
    rng = np.random.default_rng(seed)
    for start in range(0, n, CHUNK):
        x = gen.sample(min(CHUNK, n - start), seed=seed * 100_003 + start)
        groups += plant(x, rng, start)
        faiss.normalize_L2(x)
        index.add(x)
    log(f"n={n:,}: added in {time.perf_counter() - started:.0f}s")
    faiss.write_index(index, f"{out}/index.faiss")
    ids = [f"img-{i:09d}" for i in range(n)]
    pq.write_table(
        pa.table({"label": np.arange(n, dtype=np.int64), "id": ids, "uri": [f"gs://bench/{i}.jpg" for i in ids]}),
        f"{out}/ids.parquet",
        row_group_size=4096,
    )
    meta = {
        "format_version": 1, "factory": factory, "index_type": index_type, "metric": "cosine",
        "faiss_metric": "inner_product", "normalized": True, "dim": dim, "ntotal": n, "model": "bench/planted",
        "search_params": {"nprobe": 4},
    }  # fmt: skip
    with open(f"{out}/index.json", "w") as f:
        json.dump(meta, f)
    return groups


def child(index_dir: str, threshold: float | None, probes: int, result_path: str) -> None:
    """Runs in a fresh process: find the groups and save them (labels) for the parent to score."""
    from pipeline.index.duplicates import find_duplicates

    started = time.perf_counter()
    result = find_duplicates(index_dir, threshold=threshold, probes=probes)
    seconds = time.perf_counter() - started
    labels = [int(i[4:]) for i in result.table.column("id").to_pylist()]
    group_ids = result.table.column("group_id").to_pylist()
    # Read here: a child's ru_maxrss as the parent sees it counts the parent's pages at fork time.
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    with open(result_path, "w") as f:
        json.dump({"seconds": seconds, "peak": peak, "info": result.info, "labels": labels, "group_ids": group_ids}, f)


def score(planted: list[list[int]], labels: list[int], group_ids: list[int]) -> dict:
    """Recall of planted pairs, found groups, and the share of found groups made of one planted group only."""
    found = dict(zip(labels, group_ids))
    pairs = hit = 0
    for group in planted:
        for i, a in enumerate(group):
            for b in group[i + 1 :]:
                pairs += 1
                hit += found.get(a) is not None and found.get(a) == found.get(b)
    origin = {label: g for g, group in enumerate(planted) for label in group}
    members: dict[int, set] = {}
    for label, gid in found.items():
        members.setdefault(gid, set()).add(label)
    pure = sum(1 for m in members.values() if len({origin.get(x, -1 - x) for x in m}) == 1)
    whole = sum(1 for g in planted if found.get(g[0]) is not None and members[found[g[0]]] == set(g))
    return {
        "planted_groups": len(planted),
        "planted_pairs": pairs,
        "pair_recall": hit / pairs if pairs else 1.0,
        "groups_found": len(members),
        "pure_groups": pure / len(members) if members else 1.0,
        "planted_groups_whole": whole,
    }


def run(n: int, args: argparse.Namespace) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-dup-", dir=args.tmp) as tmp:
        planted = build(n, args.dim, args.index, tmp, args.seed)
        for threshold in (None, 0.99):
            result_path = f"{tmp}/result.json"
            cmd = [sys.executable, __file__, "--child", tmp, "--probes", str(args.probes), "--result", result_path]
            if threshold is not None:
                cmd += ["--threshold", str(threshold)]
            started = time.perf_counter()
            status = subprocess.run(cmd).returncode
            wall = time.perf_counter() - started
            if status != 0:
                raise RuntimeError(f"child failed with status {status}")
            with open(result_path) as f:
                res = json.load(f)
            rows.append(
                {
                    "n": n,
                    "index": res["info"]["factory"],
                    "threshold": "auto" if threshold is None else threshold,
                    "chosen": round(res["info"]["threshold"], 5),
                    "auto_clear": res["info"]["auto_clear"],
                    "seconds": round(res["seconds"], 1),
                    "process_seconds": round(wall, 1),
                    "peak_rss_gb": round(res["peak"] / 1e9, 2),
                    "index_gb": round(os.path.getsize(f"{tmp}/index.faiss") / 1e9, 2),
                    **score(planted, res["labels"], res["group_ids"]),
                }
            )
            log(json.dumps(rows[-1]))
    return rows


def table(rows: list[dict]) -> None:
    print("| N | index | threshold | chosen cos | seconds | peak RSS | index file | planted groups | found groups "
          "| planted pairs recall | pure groups | planted groups whole |")  # fmt: skip
    print("|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['n']:,} | `{r['index']}` | {r['threshold']} | {r['chosen']} | {r['seconds']} | "
            f"{r['peak_rss_gb']} GB | {r['index_gb']} GB | {r['planted_groups']:,} | {r['groups_found']:,} | "
            f"{r['pair_recall']:.4f} | {r['pure_groups']:.4f} | {r['planted_groups_whole']:,} |"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, action="append", help="corpus sizes (repeat; default 100000)")
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--index", choices=("auto", "ivf-flat", "ivf-sq8"), default="auto")
    p.add_argument("--probes", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tmp", default=None, help="where the index is written (default: the system temp dir)")
    p.add_argument("--json", default=None, help="also write the rows as JSON")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--threshold", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.child, args.threshold, args.probes, args.result)
        return 0
    rows = []
    for n in args.n or [100_000]:
        rows += run(n, args)
    table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
