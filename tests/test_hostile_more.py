"""Hostile inputs found by review after the first round: each case once broke a rule (bounded work,
one row per input, nothing lost) and is held to it here."""

from __future__ import annotations

import io
import os
import socket
import tarfile
import tracemalloc

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.io.filesystems import FileSystems
from odd_images import encode, photo
from shard_fixtures import proto_field, proto_varint

from pipeline import reasons, storage
from pipeline.formats.parquet import read_parquet
from pipeline.formats.shards import MatchShardsFn
from pipeline.formats.tar import read_tar
from pipeline.formats.tfrecord import encode_frame, read_tfrecord
from pipeline.formats.urilist import read_list
from pipeline.progress import Monitor
from pipeline.records import SourceImage
from pipeline.runs import Night, previous_of

JPEG = encode(photo((20, 16)), "JPEG", quality=80)


def _example(name: str, feature: bytes, key: str = "k") -> bytes:
    """An Example with image/id = key and one more feature `name` holding the raw Feature message."""

    def entry(n: str, value: bytes) -> bytes:
        return proto_field(1, 2, proto_field(1, 2, n.encode()) + proto_field(2, 2, value))

    key_feature = proto_field(1, 2, proto_field(1, 2, key.encode()))  # Feature.bytes_list.value = key
    image = proto_field(1, 2, proto_field(1, 2, JPEG))
    return proto_field(1, 2, entry("image/id", key_feature) + entry("image/encoded", image) + entry(name, feature))


def _rows(items):
    return [(i.id, "image") if isinstance(i, SourceImage) else (i["id"], i["error"]) for i in items]


def test_a_tfrecord_field_of_the_wrong_wire_type_is_one_corrupt_record_not_gigabytes(tmp_path):
    # A BytesList item sent as a varint of 2^32: trusted, bytes(n) would allocate 4 GB of zeros.
    huge = proto_field(1, 2, proto_field(1, 0, proto_varint(1 << 32)))
    odd_floats = proto_field(2, 2, proto_field(1, 2, b"\0" * 5))  # a packed FloatList of 5 bytes
    records = [_example("a", b"", "good-1"), _example("image/id", huge), _example("x", odd_floats, "bad-2")]
    records.append(_example("b", b"", "good-2"))
    # The id feature itself is damaged in record 1; record 2 has an odd float list in a feature read as the id.
    records[2] = _example("image/id", odd_floats)
    path = tmp_path / "s.tfrecord"
    path.write_bytes(b"".join(encode_frame(r) for r in records))
    tracemalloc.start()
    try:
        rows = _rows(read_tfrecord(str(path), "s.tfrecord", max_bytes=1 << 20))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert rows == [
        ("good-1", "image"),
        ("s.tfrecord#1", reasons.CORRUPT_RECORD),
        ("s.tfrecord#2", reasons.CORRUPT_RECORD),
        ("good-2", "image"),
    ]  # the shard goes on after a bad record
    assert peak < 32 << 20, peak


def test_many_images_of_one_tar_sample_are_held_within_max_bytes(tmp_path):
    image = encode(photo((256, 256)), "PNG")  # ~100 KB, incompressible enough
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as archive:
        for i in range(40):
            info = tarfile.TarInfo(f"k.{i}.png")
            info.size = len(image)
            archive.addfile(info, io.BytesIO(image))
    path = tmp_path / "s.tar"
    path.write_bytes(raw.getvalue())
    limit = 5 * len(image) + 1
    tracemalloc.start()
    try:
        rows = _rows(read_tar(str(path), "s.tar", max_bytes=limit))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(rows) == 40  # every member is one row
    assert [r for r in rows if r[1] == "image"] and {r[1] for r in rows} == {"image", reasons.TOO_LARGE}
    assert sum(r[1] == "image" for r in rows) == 5
    assert peak < limit + (8 << 20), peak  # not 40 images' worth


def test_a_binary_view_image_column_is_read(tmp_path):
    path = tmp_path / "v.parquet"
    pq.write_table(pa.table({"key": ["a", "b"], "jpg": pa.array([JPEG, JPEG], pa.binary_view())}), path)
    assert _rows(read_parquet(str(path), "v.parquet", max_bytes=1 << 20)) == [("a", "image"), ("b", "image")]


def test_a_stray_quote_in_a_csv_list_costs_its_own_line_only(tmp_path):
    path = tmp_path / "l.csv"
    path.write_text("uri,id\n" + '"broken.jpg,1\n' + "".join(f"img{i}.jpg,{i}\n" for i in range(2, 2000)))
    entries = list(read_list(str(path), "l.csv"))
    errors = [e for e in entries if isinstance(e, dict)]
    assert len(errors) == 1 and errors[0]["error"] == reasons.UNREADABLE and "line=2" in errors[0]["id"]
    assert len(entries) == 1 + 1998  # the other 1,998 entries are all there


def test_junk_beside_the_shards_of_a_folder_is_not_an_input(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as archive:
        info = tarfile.TarInfo("a.jpg")
        info.size = len(JPEG)
        archive.addfile(info, io.BytesIO(JPEG))
    (folder / "0.tar").write_bytes(raw.getvalue())
    os.symlink(str(tmp_path / "gone"), folder / "README")  # a dangling link that is no shard
    os.mkfifo(folder / ".lock")
    (folder / "1.tar").symlink_to(tmp_path / "gone.tar")  # named like a shard: it is an input, unreadable
    out = list(MatchShardsFn(str(tmp_path)).process((str(folder), "tar")))
    shards = [o for o in out if isinstance(o, tuple)]
    errors = [o.value for o in out if not isinstance(o, tuple)]
    assert [s[0] for s in shards] == [str(folder / "0.tar")]
    assert [e["uri"] for e in errors] == [str(folder / "1.tar")]


def test_replacing_a_runs_files_moves_the_new_ones_in_before_deleting_the_old(tmp_path, monkeypatch):
    src, dst = tmp_path / "new", tmp_path / "out"
    src.mkdir()
    dst.mkdir()
    for name in ("part-0.parquet", "part-1.parquet"):
        (src / name).write_text("new")
    for name in ("part-0.parquet", "part-1.parquet", "part-2.parquet"):
        (dst / name).write_text("old")
    seen = []
    delete = FileSystems.delete

    def watching_delete(paths):
        seen.append(sorted(os.listdir(src)))  # what had moved in when the first delete came
        return delete(paths)

    monkeypatch.setattr(FileSystems, "delete", watching_delete)
    storage.replace_parquet_files(str(src), str(dst))
    assert seen and seen[0] == []  # every new file had moved in before anything was deleted
    assert sorted(os.listdir(dst)) == ["part-0.parquet", "part-1.parquet"]
    assert {(dst / n).read_text() for n in os.listdir(dst)} == {"new"}


def test_a_night_whose_manifest_cannot_be_read_is_never_the_previous_run():
    broken = Night("r1", "/x/runs/r1", None, None)
    earlier = Night("r0", "/x/runs/r0", {"counts": {}}, None)
    tonight = Night("r2", "/x/runs/r2", {"previous_run": "r1"}, None)
    assert previous_of(tonight, [earlier, broken, tonight]) is earlier


def test_the_progress_bar_survives_a_failing_poll():
    calls = []

    def poll():
        calls.append(1)
        if len(calls) == 1:  # the first poll fails (remote metrics unreachable for a moment)
            raise ConnectionError("metrics unreachable")
        return {"listed": 4, "seen": 4, "done": 4}

    screen = io.StringIO()
    with Monitor(poll, stream=screen, tty=True):
        __import__("time").sleep(1.2)  # the bar polls every 0.5 s
    assert "4/4" in screen.getvalue()  # it went on drawing after the failure


@pytest.mark.parametrize("method", ["X0000", "QWERTY123"])
def test_metrics_do_not_grow_a_series_per_made_up_method(method, tmp_path):
    import httpx
    import numpy as np
    from index_fixtures import serve_in_thread, write_index_dir

    from pipeline.index.search import Searcher
    from pipeline.serve.app import create_app

    index = write_index_dir(tmp_path / "i", np.eye(8, dtype=np.float32) + 0.1)
    with Searcher.open(str(index)) as searcher, serve_in_thread(create_app(searcher)) as url:
        host, port = url.split("//")[1].split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(f"{method} /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            while sock.recv(65536):
                pass
        metrics = httpx.get(url + "/metrics", timeout=30).text
    assert method not in metrics
    assert 'method="other"' in metrics
