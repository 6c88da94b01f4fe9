"""Shard readers under hostile input: bombs, special files, odd names, links, empty inputs, slow buckets.

Every reader runs on real files written by real tools (tarfile, gzip, TensorFlow's
frame format, pyarrow); pipelines run on the real FnApiRunner. Bombs are small
(about 1 MB compressed, 256 MiB decompressed) and the bounds loose: a reader
that holds what it decompresses, or decompresses quadratically, misses them by far.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
import tarfile
import time
import tracemalloc
import uuid

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from embed_helpers import read_dir
from shard_fixtures import (
    SlowFs,
    Unblock,
    image_examples,
    make_images,
    write_files,
    write_list_bomb,
    write_parquet_bomb,
    write_pax_bomb,
    write_tar_bomb,
    write_tfrecord,
    write_tfrecord_bomb,
)
from test_formats import run_read, sha

from pipeline import reasons
from pipeline.config import EmbedConfig, ModelConfig
from pipeline.formats import TRUNCATED_SHARD, detect_format
from pipeline.formats.parquet import read_parquet
from pipeline.formats.shards import MatchShardsFn, ReadUriFn
from pipeline.formats.tar import read_tar
from pipeline.formats.tfrecord import encode_frame, read_tfrecord
from pipeline.formats.urilist import read_list, within_roots
from pipeline.job import run_embed
from pipeline.read import InputSpec
from pipeline.records import SourceImage

BOMB = 256 * 1024 * 1024  # decompressed bytes of each bomb
MEMORY_BOUND = 48 * 1024 * 1024  # Python allocations while reading one bomb (it holds 1 MiB pieces)


@pytest.fixture(scope="module")
def images() -> dict[str, bytes]:
    return make_images(4, seed=23)


def read_traced(reader, *args, **kwargs) -> tuple[list, int, float]:
    """(everything the reader yields, peak traced Python allocation, seconds)."""
    tracemalloc.start()
    start = time.monotonic()
    try:
        out = list(reader(*args, **kwargs))
        return out, tracemalloc.get_traced_memory()[1], time.monotonic() - start
    finally:
        tracemalloc.stop()


def summary(rows) -> list[tuple]:
    return [(r.id, "image") if isinstance(r, SourceImage) else (r["id"], r["error"]) for r in rows]


# ---------------------------------------------------------------- bombs


def test_a_tar_bomb_is_one_too_large_row_read_at_decompression_speed(tmp_path, images):
    key, data = next(iter(images.items()))
    shard = write_tar_bomb(tmp_path / "bomb.tar.gz", BOMB, after=[(key, data)])
    assert shard.stat().st_size < 2_000_000
    out, peak, seconds = read_traced(read_tar, str(shard), "bomb.tar.gz", max_bytes=1 << 20)
    assert summary(out) == [("bomb.tar.gz/0000", reasons.TOO_LARGE), (f"bomb.tar.gz/{key}", "image")]
    assert f"{BOMB:,} bytes" in out[0]["message"]  # --max-bytes applies to the decompressed size
    assert out[1].data == data
    assert peak < MEMORY_BOUND, f"{peak / 2**20:.0f} MiB held"
    assert seconds < 60


def test_a_forged_extended_tar_header_is_refused_not_read_whole(tmp_path, images):
    shard = write_pax_bomb(tmp_path / "pax.tar.gz", BOMB, after=list(images.items())[:1])
    out, peak, _ = read_traced(read_tar, str(shard), "pax.tar.gz", max_bytes=1 << 20)
    assert summary(out) == [("pax.tar.gz#offset=0", TRUNCATED_SHARD)]
    assert "extended header" in out[0]["message"]
    assert peak < MEMORY_BOUND, f"{peak / 2**20:.0f} MiB held"


def test_a_tfrecord_bomb_is_one_too_large_row_and_the_next_record_is_read(tmp_path, images):
    key, data = next(iter(images.items()))
    shard = write_tfrecord_bomb(tmp_path / "bomb.tfrecord.gz", BOMB, after=image_examples([(key, data)]))
    out, peak, seconds = read_traced(read_tfrecord, str(shard), "bomb", max_bytes=1 << 20)
    assert summary(out) == [("bomb#0", reasons.TOO_LARGE), (key, "image")]
    assert peak < MEMORY_BOUND, f"{peak / 2**20:.0f} MiB held"
    assert seconds < 60


def test_gzipped_uri_lists_are_read_and_a_huge_line_is_one_row(tmp_path, images):
    files = write_files(tmp_path / "img", images)
    listing = write_list_bomb(tmp_path / "l.txt.gz", BOMB, before=[str(files[0]), "# comment"], after=[str(files[1])])
    with open(listing, "ab") as out:  # a second gzip member (readers must go on) with a line that is not UTF-8
        out.write(gzip.compress(b"x\xff.jpg\n"))
    out, peak, _ = read_traced(read_list, str(listing), "l.txt.gz")
    got = [(e[1], e[2]) if isinstance(e, tuple) else (e["id"], e["error"]) for e in out]
    assert got == [
        (str(files[0]), "line=1"),
        ("l.txt.gz#line=3", reasons.UNREADABLE),
        (str(files[1]), "line=4"),
        ("l.txt.gz#line=5", reasons.UNREADABLE),
    ]
    assert "over the 65,536" in out[1]["message"] and "not UTF-8" in out[3]["message"]
    assert peak < MEMORY_BOUND, f"{peak / 2**20:.0f} MiB held"
    assert listing.stat().st_size < 2_000_000
    csv_list = tmp_path / "l.csv.gz"
    csv_list.write_bytes(gzip.compress(f"uri,id\n{files[2]},two\n{files[3]},\n".encode()))
    assert [e[:2] for e in read_list(str(csv_list), "l.csv.gz")] == [("two", str(files[2])), (None, str(files[3]))]


PARQUET_CHECK = r"""
import collections, json, sys
import apache_beam as beam
import pyarrow as pa
from pipeline.formats.parquet import read_parquet
from pipeline.formats.urilist import read_list
path, kind, max_bytes = sys.argv[1], sys.argv[2], int(sys.argv[3])
rows = collections.Counter()
if kind == "images":
    for item in read_parquet(path, "p", max_bytes=max_bytes):
        rows["image" if not isinstance(item, dict) else item["error"]] += 1
else:
    for item in read_list(path, "p", uri_column="uri"):
        rows["listed" if isinstance(item, tuple) else item["error"]] += 1
print(json.dumps({"rows": rows, "arrow_peak": pa.default_memory_pool().max_memory()}))
"""


@pytest.mark.parametrize("case", ["one-value", "repeated-value", "repeated-uri"])
def test_a_small_parquet_file_cannot_make_pyarrow_allocate_its_decompressed_size(tmp_path, case):

    path = write_parquet_bomb(tmp_path / f"{case}.parquet", case)
    assert path.stat().st_size < 200_000
    kind = "uris" if case == "repeated-uri" else "images"
    done = subprocess.run(
        [sys.executable, "-c", PARQUET_CHECK, str(path), kind, str(16 << 20)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    expected = {
        "one-value": {reasons.TOO_LARGE: 1},  # the whole row group, refused from its footer
        "repeated-value": {"image": 2, reasons.TOO_LARGE: 1},  # 16 MiB handed out, then the rest refused
        "repeated-uri": {reasons.UNREADABLE: 20_000},  # each entry too long, none copied out
    }[case]
    assert got["rows"] == expected
    assert got["arrow_peak"] < 64 << 20, f"pyarrow peaked at {got['arrow_peak'] / 2**20:.0f} MiB"


# ---------------------------------------------------------------- only regular files


@pytest.mark.parametrize(
    ("name", "reader"),
    [
        ("x.tar", lambda p: read_tar(p, "x", max_bytes=1 << 20)),
        ("x.tfrecord", lambda p: read_tfrecord(p, "x", max_bytes=1 << 20)),
        ("x.parquet", lambda p: read_parquet(p, "x", max_bytes=1 << 20)),
        ("x.txt", lambda p: read_list(p, "x")),
    ],
)
def test_a_fifo_named_like_a_shard_is_an_unreadable_row_never_a_hang(tmp_path, name, reader):
    fifo = tmp_path / name
    os.mkfifo(fifo)
    with Unblock(fifo) as guard:
        out = list(reader(str(fifo)))
    assert not guard.fired, "the reader blocked on the FIFO"
    assert [(r["id"], r["error"]) for r in out] == [("x", reasons.UNREADABLE)]
    assert "FIFO" in out[0]["message"]


def test_devices_and_fifos_in_a_uri_list_are_unreadable_rows(tmp_path, images):
    key, data = next(iter(images.items()))
    (good,) = write_files(tmp_path / "img", {key: data})
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    listing = tmp_path / "lists" / "l.txt"
    listing.parent.mkdir()
    listing.write_text(f"{good}\n/dev/zero\n{fifo}\n")
    with Unblock(fifo, after=30):
        run_read(
            InputSpec(paths=str(listing)),
            images=[(str(good), str(good), sha(data), None)],
            errors=[("/dev/zero", "/dev/zero", reasons.UNREADABLE), (str(fifo), str(fifo), reasons.UNREADABLE)],
            messages={"/dev/zero": "character device, not a regular file", str(fifo): "FIFO"},
        )


# ---------------------------------------------------------------- WebDataset keys, links, samples


def _member(archive: tarfile.TarFile, name: str, data: bytes = b"", **fields) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for attr, value in fields.items():
        setattr(info, attr, value)
    archive.addfile(info, io.BytesIO(data) if info.isreg() else None)


def test_webdataset_dotted_keys_links_and_samples_without_an_image(tmp_path, images):
    (_, d0), (_, d1), (_, d2), (_, d3) = images.items()
    shard = tmp_path / "s.tar"
    with tarfile.open(shard, "w", format=tarfile.PAX_FORMAT) as archive:
        # webdataset's TarWriter with keys `a.b.c` and `a.b.d`: read back as one sample `a`
        _member(archive, "a.b.c.jpg", d0)
        _member(archive, "a.b.c.json", b'{"n": 1}')
        _member(archive, "a.b.d.JPG", d1)
        _member(archive, "dir", type=tarfile.DIRTYPE)
        _member(archive, "plain.png", d2)
        _member(archive, "plain.json", b'{"n": 2}')
        _member(archive, "noimg.cls", b"3")
        _member(archive, "noimg.json", b"{}")
        _member(archive, "soft.jpg", type=tarfile.SYMTYPE, linkname="plain.png")
        _member(archive, "hard.jpg", type=tarfile.LNKTYPE, linkname="plain.png")
        _member(archive, "x/y.seg.webp", d3)
    counters = run_read(
        InputSpec(paths=str(shard)),
        images=[
            ("s.tar/a.b.c", f"{shard}#a.b.c.jpg", sha(d0), '{"n": 1}'),
            ("s.tar/a.b.d", f"{shard}#a.b.d.JPG", sha(d1), None),
            ("s.tar/plain", f"{shard}#plain.png", sha(d2), '{"n": 2}'),
            ("s.tar/x/y.seg", f"{shard}#x/y.seg.webp", sha(d3), None),
        ],
        errors=[
            ("s.tar/noimg", f"{shard}#noimg.cls", reasons.NOT_AN_IMAGE),
            ("s.tar/soft", f"{shard}#soft.jpg", reasons.UNREADABLE),
            ("s.tar/hard", f"{shard}#hard.jpg", reasons.UNREADABLE),
        ],
        messages={
            "s.tar/noimg": "fields: cls, json",
            "s.tar/soft": "is a symbolic link to 'plain.png'; links inside shards are not followed",
            "s.tar/hard": "hard link to 'plain.png'",
        },
    )
    assert counters["images_seen"] == 7 and counters["images_failed_read"] == 3


# ---------------------------------------------------------------- inputs that hold nothing


def test_an_input_without_shards_says_what_it_holds_and_suggests_the_format(tmp_path, images):
    photos = tmp_path / "photos"
    write_files(photos, images)
    (photos / "notes.txt").write_text("x")
    tfr = tmp_path / "tfr"
    for i in range(2):
        write_tfrecord(tfr / f"train.tfrecord-0000{i}-of-00002", image_examples([(f"k{i}", images["img00"])]))
    run_read(
        InputSpec(paths=(str(photos), f"{tfr}/*.tar"), format="tar"),
        errors=[("photos", str(photos), reasons.EMPTY_INPUT), ("tfr/*.tar", f"{tfr}/*.tar", reasons.EMPTY_INPUT)],
        messages={
            "photos": "5 files under",  # then their kinds, most common first, and the format they suggest
            "tfr/*.tar": "2 files under",
        },
    )
    (message,) = [m for m in _empty_messages(InputSpec(paths=(str(photos), str(tfr)), format="tar")) if "photos" in m]
    assert message.endswith("(.jpg: 4, .txt: 1); did you mean --input-format files?")
    run_read(
        f"{tfr}/*.tar",
        errors=[("*.tar", f"{tfr}/*.tar", reasons.EMPTY_INPUT)],
        messages={"*.tar": "(.tfrecord-N-of-N: 2); did you mean --input-format tfrecord?"},
    )


def _empty_messages(spec: InputSpec) -> list[str]:
    fn = MatchShardsFn(spec.root())
    return [out.value["message"] for source in spec.sources() for out in fn.process(source)]


@pytest.mark.parametrize(
    ("name", "fmt"),
    [
        ("data/train.tfrecord-*", "tfrecord"),
        ("data/train.tfrecord-000[0-4]?-of-00010", "tfrecord"),
        ("data/*.tfrecord*", "tfrecord"),
        ("data/*.tfrecord-*.gz", "tfrecord"),
        ("shards/*.tar*", "tar"),
        ("shards/*.tar.*", "tar"),
        ("pq/part-*.parquet*", "parquet"),
        ("data/*.tf*", None),  # the wildcard is inside the extension: ambiguous
        ("data/*", None),
        ("data/*.tar*.parquet", "parquet"),  # the literal end wins
    ],
)
def test_shard_extensions_are_recognised_inside_globs(name, fmt):
    assert detect_format(name) == fmt


def test_a_tfds_style_glob_is_read_as_tfrecord(tmp_path, images):
    items = list(images.items())[:2]
    for i, (key, data) in enumerate(items):
        write_tfrecord(tmp_path / "data" / f"train.tfrecord-0000{i}-of-00002", image_examples([(key, data)]))
    pattern = f"{tmp_path}/data/train.tfrecord-*"
    shards = [tmp_path / "data" / f"train.tfrecord-0000{i}-of-00002" for i in range(2)]
    counters = run_read(pattern, images=[(k, f"{s}#0", sha(d), None) for s, (k, d) in zip(shards, items)], errors=[])
    assert counters["images_seen"] == 2


# ---------------------------------------------------------------- names that are not UTF-8


@pytest.mark.slow
def test_names_that_are_not_utf8_become_escaped_text_and_the_job_finishes(tmp_path, images):
    (_, d0), (k1, d1), (k2, d2), (_, d3) = images.items()
    root = os.fsencode(tmp_path)
    tar_path = os.fsdecode(root + b"/caf\xe9.tar")
    with tarfile.open(tar_path, "w", format=tarfile.GNU_FORMAT, errors="surrogateescape") as archive:
        _member(archive, os.fsdecode(b"k\xff.jpg"), d0)
    tfr_path = os.fsdecode(root + b"/t\xe9.tfrecord")
    with open(tfr_path, "wb") as out:
        out.write(b"".join(encode_frame(e) for e in image_examples([(k1, d1)])))
    pq_path = os.fsdecode(root + b"/p\xe9.parquet")
    with open(pq_path, "wb") as out:
        pq.write_table(pa.table({"key": [k2], "jpg": pa.array([d2], pa.binary())}), out)
    folder = root + b"/d\xe9"
    os.mkdir(folder)
    with open(folder + b"/img.jpg", "wb") as out:
        out.write(d3)
    with open(folder + b"/list.txt", "wb") as out:
        out.write(b"img.jpg\n")
    # The names come from globs (a literal --input path travels through beam.Create as UTF-8 text).
    spec = InputSpec(paths=tuple(f"{tmp_path}/{glob}" for glob in ("*.tar", "*.tfrecord", "*.parquet", "*/*.txt")))
    output = tmp_path / "out"
    done = run_embed(
        EmbedConfig(input=spec, output=str(output), model=ModelConfig(image_size=32, weights="random"), batch_size=4)
    )
    assert (done["counts"]["embedded"], done["counts"]["failed"]) == (4, 0)
    rows = {r["id"]: r["uri"] for r in read_dir(output / "embeddings").to_pylist()}
    base = str(tmp_path)
    assert rows == {
        "caf\\xe9.tar/k\\xff": f"{base}/caf\\xe9.tar#k\\xff.jpg",
        k1: f"{base}/t\\xe9.tfrecord#0",
        k2: f"{base}/p\\xe9.parquet#row=0",
        "d\\xe9/img.jpg": f"{base}/d\\xe9/img.jpg",
    }


# ---------------------------------------------------------------- listed URIs: roots, concurrency


@pytest.mark.parametrize(
    ("uri", "roots", "allowed"),
    [
        ("/data/x/a.jpg", ("/data/x",), True),
        ("/data/x/a.jpg", ("/data/x/",), True),
        ("/data/xy/a.jpg", ("/data/x",), False),
        ("/data/x/../y/a.jpg", ("/data/x",), False),
        ("/data/x", ("/data/x",), True),
        ("gs://b/x/a.jpg", ("gs://b/x", "/data"), True),
        ("gs://b/xy/a.jpg", ("gs://b/x",), False),
        ("gs://b/x/../../c/x/a.jpg", ("gs://b/x",), False),
        ("gs://b/x/a.jpg", ("/b/x",), False),
        ("anything", (), True),
    ],
)
def test_within_roots_compares_whole_path_components(uri, roots, allowed):
    assert within_roots(uri, roots) is allowed


def test_allow_roots_admits_only_uris_under_a_root(tmp_path, images):
    (k0, d0), (k1, d1), (k2, d2), (k3, d3) = images.items()
    data = tmp_path / "data"
    (inside,) = write_files(data / "x", {k0: d0})
    (nested,) = write_files(data / "x" / "sub", {k1: d1})
    (sibling,) = write_files(data / "xy", {k2: d2})
    (secret,) = write_files(tmp_path / "secret", {k3: d3})
    link = data / "x" / "link.jpg"
    link.symlink_to(secret)
    listing = tmp_path / "lists" / "l.txt"
    listing.parent.mkdir()
    escape = f"{data}/x/../../secret/{k3}.jpg"
    listing.write_text("\n".join([str(inside), f"../data/x/sub/{k1}.jpg", str(sibling), escape, str(link)]) + "\n")
    outside = [str(sibling), str(secret), str(link)]  # the escape is listed normalised: it names `secret`
    run_read(
        InputSpec(paths=str(listing), allow_roots=(f"{data}/x",)),
        images=[(str(inside), str(inside), sha(d0), None), (str(nested), str(nested), sha(d1), None)],
        errors=[(u, u, reasons.UNREADABLE) for u in outside],
        messages={u: "outside --allow-roots" for u in outside},
    )


def test_listed_uris_are_read_concurrently_and_a_slowly_failing_bucket_fails_fast():
    down = f"down-{uuid.uuid4().hex[:8]}"  # the slow-bucket memory is per process: a fresh bucket per run
    entries = []
    for i in range(32):
        entries.append((f"d{i}", f"slowfs://{down}/{i}.jpg"))
        if i % 4 == 0:
            entries.append((f"u{i}", f"slowfs://up/{i}.jpg"))
    del SlowFs.opened[:]

    def check_errors(rows):
        assert sorted(r["id"] for r in rows) == sorted(f"d{i}" for i in range(32))
        assert {r["error"] for r in rows} == {reasons.UNREADABLE}
        fast = [r["message"] for r in rows if "failed slowly" in r["message"]]
        assert len(fast) >= 32 - 8, fast
        assert all(f"slowfs://{down}/" in m and "connection timed out" in m for m in fast)

    start = time.monotonic()
    with TestPipeline(runner="FnApiRunner") as p:
        read = (
            p
            | beam.Create(entries)
            | beam.ParDo(ReadUriFn(1 << 20, threads=8, slow_failure_s=0.5, fail_fast_s=120)).with_outputs(
                "errors", main="images"
            )
        )
        assert_that(read.images | beam.Map(lambda im: im.id), equal_to([f"u{i}" for i in range(0, 32, 4)]))
        assert_that(read.errors, check_errors, label="Errors")
    seconds = time.monotonic() - start
    slow_opens = [u for u in SlowFs.opened if down in u]
    # One wave of at most 8 concurrent slow failures; read one after another they would take 32 s.
    assert len(slow_opens) <= 8, slow_opens
    assert seconds < 20, seconds
