"""Decompression bombs through the whole job: each must be one error row, in seconds and bounded memory.

Usage:
    python benchmarks/bombs.py                  # 2 GiB-decompressed bombs
    python benchmarks/bombs.py --size-mib 512   # smaller, quicker

Builds, in a temporary directory, three inputs that are a few MB on disk and
`--size-mib` of zeros once decompressed:

  - `bomb.tar.gz`: a WebDataset tar with one member `0000.jpg` of zeros;
  - `bomb.tfrecord.gz`: a TFRecord with one well-formed record of zeros;
  - `bomb.txt.gz`: a URI list whose one line is that many bytes long;

then runs the real `embedpipe embed` (`python -m pipeline embed`, seeded random
weights, image size 32) on each in a child process and prints a table: input,
bytes on disk, bytes decompressed, wall seconds, the child's peak RSS (from
os.wait4: that process alone, not this one), and the output's rows by reason.
Target: one error row each, under 30 s and 300 MB.
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

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

TARGET_SECONDS = 30
TARGET_RSS_MB = 300


def build(folder: pathlib.Path, size: int) -> list[pathlib.Path]:
    """The three bombs, compressed at gzip level 9 (about 1000:1 for zeros)."""
    from shard_fixtures import write_list_bomb, write_tar_bomb, write_tfrecord_bomb

    return [
        write_tar_bomb(folder / "bomb.tar.gz", size, level=9),
        write_tfrecord_bomb(folder / "bomb.tfrecord.gz", size, level=9),
        write_list_bomb(folder / "bomb.txt.gz", size, level=9),
    ]


def run_embed(bomb: pathlib.Path, output: pathlib.Path) -> dict:
    """`embedpipe embed` on one input in a child process: wall seconds, peak RSS, exit code, manifest."""
    command = [sys.executable, "-m", "pipeline", "embed", "--input", str(bomb), "--output", str(output)]
    command += ["--weights", "random", "--image-size", "32", "--batch-size", "4"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
    start = time.monotonic()
    with open(output.parent / f"{bomb.name}.log", "wb") as log:
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(REPO))
        _, status, usage = os.wait4(child.pid, 0)
    seconds = time.monotonic() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    manifest_path = output / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    return {
        "seconds": seconds,
        "rss_mb": usage.ru_maxrss / 1024,  # Linux: KiB
        "returncode": child.returncode,
        "manifest": manifest,
        "log": str(output.parent / f"{bomb.name}.log"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=2048, help="decompressed size of each bomb (default 2048)")
    parser.add_argument("--keep", help="build and run in this directory and keep it (default: a temporary one)")
    args = parser.parse_args(argv)
    size = args.size_mib * 1024 * 1024
    with tempfile.TemporaryDirectory(prefix="bombs-") as scratch:
        folder = pathlib.Path(args.keep or scratch)
        folder.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        bombs = build(folder, size)
        print(f"built {len(bombs)} bombs of {size:,} bytes decompressed in {time.monotonic() - started:.0f} s")
        header = f"{'input':<18} {'on disk':>11} {'decompressed':>15} {'wall s':>7} {'peak RSS MB':>12}  rows by reason"
        print(header)
        print("-" * len(header))
        ok = True
        for bomb in bombs:
            got = run_embed(bomb, folder / f"out-{bomb.name}")
            manifest = got["manifest"]
            rows = dict(manifest.get("failed_by_reason", {}))
            embedded = manifest.get("counts", {}).get("embedded", 0)
            if embedded:
                rows["embedded"] = embedded
            shown = ", ".join(f"{k}: {v}" for k, v in sorted(rows.items())) or f"no manifest (exit {got['returncode']})"
            print(
                f"{bomb.name:<18} {bomb.stat().st_size:>11,} {size:>15,} {got['seconds']:>7.1f} "
                f"{got['rss_mb']:>12.0f}  {shown}"
            )
            within = got["seconds"] < TARGET_SECONDS and got["rss_mb"] < TARGET_RSS_MB
            ok = ok and got["returncode"] == 0 and sum(rows.values()) == 1 and within
            if got["returncode"] != 0:
                print(f"  exit {got['returncode']}: see {got['log']}")
        verdict = "met" if ok else "MISSED"
        print(f"target: one error row each, under {TARGET_SECONDS} s and {TARGET_RSS_MB} MB: {verdict}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
