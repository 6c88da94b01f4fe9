"""pipeline/storage.py: only regular files are opened, reads and decompression are bounded, names are text."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import time
import tracemalloc

import pytest
from odd_images import encode, photo

from pipeline import reasons
from pipeline.imaging import DecodeError, decode_image
from pipeline.storage import (
    NotRegularFileError,
    TooLargeError,
    check_regular,
    decompressed,
    open_regular,
    read_bounded,
    read_snapshot,
    safe_text,
)


def test_a_fifo_is_refused_at_once_not_read(tmp_path):
    fifo = tmp_path / "x.jpg"
    os.mkfifo(fifo)
    start = time.monotonic()
    with pytest.raises(NotRegularFileError, match="FIFO"):
        open_regular(str(fifo))
    with pytest.raises(NotRegularFileError, match="FIFO"):
        check_regular(str(fifo))
    assert time.monotonic() - start < 5  # a plain open() would block until a writer came


def test_devices_and_directories_are_refused(tmp_path):
    with pytest.raises(NotRegularFileError, match="character device"):
        read_bounded("/dev/zero", 1024)  # without the check: a read that never ends
    with pytest.raises(NotRegularFileError, match="directory"):
        open_regular(str(tmp_path))


def test_regular_files_read_whole_or_refused_over_the_limit(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"x" * 1000)
    assert read_bounded(str(path), 1000) == b"x" * 1000
    with pytest.raises(TooLargeError):
        read_bounded(str(path), 999)
    data, st = read_snapshot(str(path), 10_000)
    assert data == b"x" * 1000 and st.st_size == 1000


@pytest.mark.parametrize(
    "name, compress",
    [("gzip", gzip.compress), ("bz2", bz2.compress), ("xz", lzma.compress), ("none", lambda b: b)],
)
def test_decompression_is_sniffed_from_the_magic_number(name, compress):
    payload = bytes(range(256)) * 1000
    stream, found = decompressed(io.BytesIO(compress(payload)))
    assert found == name
    assert stream.read() == payload


def test_a_gzip_bomb_decompresses_in_bounded_memory():
    # 256 MiB of zeros in ~250 KB: each read returns at most what it asks for.
    raw = io.BytesIO()
    with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9) as z:
        block = b"\0" * (1 << 20)
        for _ in range(256):
            z.write(block)
    assert len(raw.getvalue()) < 1_000_000
    raw.seek(0)
    tracemalloc.start()
    try:
        stream, _ = decompressed(raw)
        total = 0
        while chunk := stream.read(1 << 20):
            total += len(chunk)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert total == 256 << 20
    assert peak < 16 << 20, peak


def test_undecodable_names_become_escaped_text():
    name = os.fsdecode(b"photos/caf\xe9 \xff.jpg")
    escaped = safe_text(name)
    assert escaped == "photos/caf\\xe9 \\xff.jpg"
    escaped.encode("utf-8")  # valid text: it can be a Parquet string and a Beam str
    assert safe_text("ünï/☃.jpg") == "ünï/☃.jpg"  # valid names never change


def test_a_jpeg_header_claiming_more_pixels_than_its_bytes_can_hold_is_truncated():
    data = bytearray(encode(photo((16, 16)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = (9000).to_bytes(2, "big") + (9000).to_bytes(2, "big")  # height, width
    with pytest.raises(DecodeError) as info:
        decode_image(bytes(data), size=32, max_pixels=100_000_000)
    assert info.value.reason == reasons.TRUNCATED
    assert "9000x9000" in str(info.value)


def test_query_decoding_matches_the_thumbnail_draft_scale_without_building_one():
    # 800x600 at size 32: 1/8 scale (100x75) covers 2 x 32 but not the 128 px thumbnail, which needs 1/4.
    data = encode(photo((800, 600)), "JPEG", quality=90)
    embedded, _, _, thumb = decode_image(data, size=32, max_pixels=10**8, thumbnail=True)
    queried, _, _, none = decode_image(data, size=32, max_pixels=10**8, thumbnail=False, draft_for_thumbnail=True)
    assert thumb is not None and none is None
    assert (embedded == queried).all()
    plain, *_ = decode_image(data, size=32, max_pixels=10**8)
    assert not (plain == embedded).all()  # the draft scale does matter, so it must be matched
