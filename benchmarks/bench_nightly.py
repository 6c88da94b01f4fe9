"""Wall time of nightly runs: full vs unchanged rerun vs rerun with 5% changed.

Usage:
    python benchmarks/bench_nightly.py [--count 1000] [--changed 0.05] [--weights random]

Each run is `embedpipe nightly` in a fresh interpreter (as cron or Cloud Run would start it),
one after the other on the same corpus: a full first night, an unchanged rerun (files with
unchanged size+mtime are not even read), the same with --verify-content (every file read and
hashed), then a rerun with a fraction changed (a third of it deleted, the rest rewritten, plus as
many new files as deleted). Prints a table with each run's wall time, its counts and its ratio to
the full run. Target: the unchanged rerun costs <= 10% of the full run.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def run(corpus: pathlib.Path, root: pathlib.Path, run_id: str, extra: list[str]) -> tuple[float, dict]:
    cmd = [sys.executable, "-m", "pipeline", "nightly", "--input", str(corpus), "--root", str(root)]
    cmd += ["--run-id", run_id, *extra]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{run_id} failed:\n{done.stderr[-3000:]}")
    return wall, json.loads((root / "runs" / run_id / "manifest.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--changed", type=float, default=0.05, help="fraction changed in the third run")
    parser.add_argument("--weights", default="random")
    parser.add_argument("--megapixels", type=float, default=0.5)
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "embedpipe-bench-nightly"))
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from pipeline.sample import jpeg_bytes, make_corpus, photos, variant

    work = pathlib.Path(args.workdir)
    corpus, root = work / "corpus", work / "root"
    for p in (corpus, root):
        if p.exists():
            subprocess.run(["rm", "-rf", str(p)], check=True)
    make_corpus(corpus, count=args.count, megapixels=(args.megapixels, args.megapixels), seed=2, with_bad=False)
    extra = ["--weights", args.weights, "--index-type", "flat"]
    print(f"machine: {os.cpu_count()} CPUs; corpus: {args.count} JPEGs of {args.megapixels} MP", flush=True)

    rows = [("full (first night)", *run(corpus, root, "n1", extra))]
    print(f"full: {rows[-1][1]:.1f}s", flush=True)
    rows.append(("unchanged rerun", *run(corpus, root, "n2", extra)))
    print(f"unchanged: {rows[-1][1]:.1f}s", flush=True)
    rows.append(("unchanged rerun, --verify-content", *run(corpus, root, "n2v", [*extra, "--verify-content"])))
    print(f"unchanged, every file read and hashed: {rows[-1][1]:.1f}s", flush=True)

    files = sorted(corpus.rglob("*.jpg"))
    rng = np.random.default_rng(7)
    k = max(1, int(len(files) * args.changed))
    picks = rng.choice(len(files), size=k, replace=False)
    base = photos()
    names = sorted(base)
    for j, i in enumerate(picks):
        path = files[i]
        if j % 3 == 0:
            path.unlink()  # deleted
        else:  # changed content under the same id
            img = variant(base[names[j % len(names)]], rng, args.megapixels)
            path.write_bytes(jpeg_bytes(img))
    for j in range(k // 3):  # as many new images as deleted ones
        img = variant(base[names[j % len(names)]], rng, args.megapixels)
        (corpus / f"new_{j:04d}.jpg").write_bytes(jpeg_bytes(img))
    rows.append((f"rerun, {args.changed:.0%} changed", *run(corpus, root, "n3", extra)))
    print(f"changed: {rows[-1][1]:.1f}s", flush=True)

    full = rows[0][1]
    print()
    print("| run | wall s | ratio to full | seen | embedded | reused | of which not read | deleted |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, wall, m in rows:
        c = m["counts"]
        print(
            f"| {name} | {wall:.1f} | {wall / full:.2f} | {c['seen']} | {c['embedded']} | {c['reused']} "
            f"| {c.get('reused_by_marker', 0)} | {c['deleted']} |"
        )


if __name__ == "__main__":
    main()
