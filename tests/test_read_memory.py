"""Reading a big shard streams it: peak memory stays far below the shard size.

Each measurement runs the read stage alone (ReadImages -> per-image byte count,
no decode, no model) in a fresh Python process on the FnApiRunner, and reads
that process's peak RSS (VmHWM of /proc/self/status; `resource.getrusage`'s
ru_maxrss is reported beside it, but Linux folds the parent's peak into it). A
baseline process reads a tiny shard of the same format, so the figure compared
with the bound is what the big shard added on top of Python + Beam + pyarrow.

Bound: a 384 MiB tar (96 images of 4 MiB) or a 256 MiB TFRecord / Parquet shard
(64 images) may add at most 96 MiB of peak RSS; reading it whole would add at
least its size. Tar and TFRecord hold one record
at a time; Parquet holds one row group (pyarrow decodes a row group at a time),
16 MiB in this shard, as img2dataset writes small row groups.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from shard_fixtures import tf_example

from pipeline.formats.tfrecord import encode_frame

MEMBER_BYTES = 4 * 1024 * 1024
ALLOWED_GROWTH_MIB = 96

_SCRIPT = r"""
import json, resource, sys
import apache_beam as beam
from pipeline.runner import pipeline_options
from pipeline.read import ReadImages

spec, out = sys.argv[1], sys.argv[2]
with beam.Pipeline(options=pipeline_options([])) as p:
    read = p | "ReadImages" >> ReadImages(spec, max_bytes=1 << 30)
    (
        read["images"]
        | "Sizes" >> beam.Map(lambda image: (1, len(image.data)))
        | "Sum" >> beam.CombineGlobally(lambda pairs: tuple(map(sum, zip(*pairs))) if pairs else (0, 0))
        | "Save" >> beam.Map(lambda total: open(out, "w").write(json.dumps(total)))
    )
count, total = json.load(open(out))
# VmHWM is the peak RSS of this process image alone. getrusage's ru_maxrss is printed too, but
# Linux carries the parent's peak into it across fork/exec, so a big test runner would mask ours.
with open("/proc/self/status") as status:
    hwm_kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
maxrss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
print(json.dumps({"images": count, "bytes": total, "peak_mib": hwm_kib / 1024, "ru_maxrss_mib": maxrss_mib}))
"""


def _blocks(count: int):
    """`count` 4 MiB images: one random block, varied in its first bytes (cheap, incompressible)."""
    block = bytearray(os.urandom(MEMBER_BYTES))
    for i in range(count):
        block[:8] = i.to_bytes(8, "little")
        yield f"{i:05d}", bytes(block)


def _write_tar(path: str, count: int) -> None:
    with tarfile.open(path, "w") as archive:
        for key, data in _blocks(count):
            info = tarfile.TarInfo(f"{key}.jpg")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


def _write_tfrecord(path: str, count: int) -> None:
    with open(path, "wb") as out:
        for key, data in _blocks(count):
            out.write(encode_frame(tf_example({"image/id": key.encode(), "image/encoded": data})))


def _write_parquet(path: str, count: int) -> None:
    schema = pa.schema([("key", pa.string()), ("jpg", pa.binary())])
    rows = _blocks(count)
    with pq.ParquetWriter(path, schema, compression="none") as writer:
        for _ in range(0, count, 4):  # 4 rows of 4 MiB: 16 MiB row groups
            chunk = [next(rows) for _ in range(4)]
            writer.write_table(pa.table({"key": [k for k, _ in chunk], "jpg": [d for _, d in chunk]}, schema=schema))


def _measure(spec: str, tmp_path) -> dict:
    out = tmp_path / f"result-{os.path.basename(spec)}.json"
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT, spec, str(out)], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize(
    ("suffix", "write", "images"),
    [(".tar", _write_tar, 96), (".tfrecord", _write_tfrecord, 64), (".parquet", _write_parquet, 64)],
)
def test_reading_a_big_shard_keeps_peak_rss_far_below_its_size(tmp_path, suffix, write, images):
    small = tmp_path / f"small{suffix}"
    big = tmp_path / f"big{suffix}"
    write(str(small), 4)
    write(str(big), images)
    size_mib = os.path.getsize(big) / 2**20

    base = _measure(str(small), tmp_path)
    got = _measure(str(big), tmp_path)
    growth = got["peak_mib"] - base["peak_mib"]
    print(
        f"{suffix} {size_mib:.0f} MiB: peak RSS {got['peak_mib']:.0f} MiB, baseline {base['peak_mib']:.0f} MiB, "
        f"growth {growth:.0f} MiB (bound {ALLOWED_GROWTH_MIB} MiB); ru_maxrss {got['ru_maxrss_mib']:.0f} MiB"
    )

    assert (base["images"], got["images"]) == (4, images)
    assert got["bytes"] == images * MEMBER_BYTES
    assert size_mib >= images * MEMBER_BYTES / 2**20
    assert growth < ALLOWED_GROWTH_MIB, f"reading a {size_mib:.0f} MiB {suffix} grew peak RSS by {growth:.0f} MiB"
