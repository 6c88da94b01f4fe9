"""The `files` format under hostile input: odd names, FIFOs, links, files that change, inputs without images.

Real files on the local disk, a real Beam runner (FnApiRunner), real Parquet and
FAISS in the nightly runs. A FIFO is never opened for reading here without a
deadline: where the old code would wait on one forever, the test unblocks it
and fails instead of hanging.
"""

from __future__ import annotations

import io
import os
import pathlib
import socket
import tarfile
import threading
import time

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.coders import registry
from apache_beam.io.filesystem import FileMetadata
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from embed_helpers import embeddings_by_id, read_dir
from odd_images import encode, photo
from PIL import Image

from pipeline import reasons
from pipeline.config import EmbedConfig, IndexConfig, ModelConfig
from pipeline.formats.files import ListFilesFn, ReadFileFn, change_marker, list_local
from pipeline.nightly import NightlyConfig, run_nightly
from pipeline.read import InputSpec, ReadImages, relative_id
from pipeline.storage import FileChangedError

OLD = 1_700_000_000  # mtimes well in the past: every file gets a change marker
ODD = b"caf\xe9.png"  # Latin-1 bytes: not UTF-8
ODD_ID = "caf\\xe9.png"  # its id and uri text


def png(seed: int, name: str = "astronaut") -> bytes:
    rng = np.random.default_rng(seed)
    img = np.asarray(photo((40, 36), name)).astype(np.int16) + rng.integers(-30, 30, (36, 40, 3))
    return encode(Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)), "PNG")


def write(path, data: bytes, mtime: float = OLD) -> None:
    with open(path, "wb") as f:
        f.write(data)
    os.utime(path, (mtime, mtime))


def marker_of(path) -> str:
    st = os.stat(path)
    return f"size={st.st_size};mtime={st.st_mtime!r}"


def split(outputs) -> tuple[list, list]:
    """A DoFn's outputs -> (main outputs, error rows)."""
    outputs = list(outputs)
    main = [o for o in outputs if not isinstance(o, beam.pvalue.TaggedOutput)]
    return main, [o.value for o in outputs if isinstance(o, beam.pvalue.TaggedOutput)]


def run_read(spec, *, images: list, errors: list, max_bytes: int = 1_000_000) -> int:
    """ReadImages on the FnApiRunner; asserts (id, uri) of images and (id, uri, error) of rows; returns seen."""
    p = TestPipeline(runner="FnApiRunner")
    read = p | "ReadImages" >> ReadImages(spec, max_bytes=max_bytes)
    assert_that(read["images"] | "Ids" >> beam.Map(lambda im: (im.id, im.uri)), equal_to(images), label="Images")
    bad = read["errors"] | "Rows" >> beam.Map(lambda e: (e["id"], e["uri"], e["error"]))
    assert_that(bad, equal_to(errors), label="Errors")
    result = p.run()
    result.wait_until_finish()
    found = result.metrics().query(MetricsFilter().with_namespace("embedpipe").with_name("images_seen"))["counters"]
    return sum(c.committed for c in found)


# -- names that are not UTF-8 ------------------------------------------------------------------


def test_the_listing_crosses_beam_coders_with_undecodable_names_intact():
    # FileMetadata has no coder of its own: Beam's fallback pickles it, and pickle keeps lone
    # surrogates, so the real path (the one to open) survives the reshuffle. A plain str would not.
    meta = FileMetadata(os.fsdecode(b"/data/" + ODD), 10, 1.0)
    coder = registry.get_coder(FileMetadata)
    assert coder.decode(coder.encode(meta)).path == meta.path
    with pytest.raises(UnicodeEncodeError):
        registry.get_coder(str).encode(meta.path)


def test_ids_of_undecodable_names_are_escaped_text_on_every_path(tmp_path):
    folder = os.fsdecode(bytes(tmp_path) + b"/ph\xf6tos")
    odd = f"{folder}/{os.fsdecode(ODD)}"
    os.makedirs(folder)
    write(odd, png(1))
    assert relative_id(folder, odd) == ODD_ID  # local listing
    assert relative_id(str(tmp_path), odd) == "ph\\xf6tos/" + ODD_ID
    assert relative_id(str(tmp_path / "elsewhere"), odd) == "../ph\\xf6tos/" + ODD_ID
    assert relative_id("gs://b", "gs://b/" + os.fsdecode(ODD)) == ODD_ID  # remote listing
    assert InputSpec(paths=(odd,)).root() == folder  # a single-file input: the real folder, to cut real paths
    assert relative_id(InputSpec(paths=(odd,)).root(), odd) == ODD_ID
    assert relative_id(InputSpec(paths=(f"{folder}/*.png",)).root(), odd) == ODD_ID


def test_single_file_and_shard_inputs_with_undecodable_names_are_read(tmp_path):
    odd = os.fsdecode(bytes(tmp_path) + b"/" + ODD)
    write(odd, png(2))
    shard = os.fsdecode(bytes(tmp_path) + b"/sh\xe9.tar")
    # Member names are bytes in a tar too (GNU format writes them as given); tarfile reads them back
    # with surrogates, as the OS does for file names.
    with tarfile.open(shard, "w", format=tarfile.GNU_FORMAT) as tar:
        for i, member in enumerate(["000.png", os.fsdecode(b"\xe9t\xe9.png")]):
            data = png(3 + i)
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    seen = run_read(
        InputSpec(paths=(odd, shard)),
        images=[
            (ODD_ID, f"{tmp_path}/{ODD_ID}"),
            ("sh\\xe9.tar/000", f"{tmp_path}/sh\\xe9.tar#000.png"),
            ("sh\\xe9.tar/\\xe9t\\xe9", f"{tmp_path}/sh\\xe9.tar#\\xe9t\\xe9.png"),
        ],
        errors=[],
    )
    assert seen == 3


def test_escaping_cannot_give_two_files_one_id(tmp_path):
    write(bytes(tmp_path) + b"/" + ODD, png(4))
    write(tmp_path / ODD_ID, png(5))  # a real backslash in the name: the same text as the escaped one
    files, rows = split(list(ListFilesFn(str(tmp_path)).process(f"{tmp_path}/**")))
    assert len(files) == 1
    assert [(r["id"], r["error"]) for r in rows] == [(ODD_ID, reasons.DUPLICATE_ID)]
    assert "rename either file" in rows[0]["message"]


def nightly(corpus, root, run_id: str) -> dict:
    embed = EmbedConfig(input=str(corpus), output="", model=ModelConfig(image_size=32, weights="random"), batch_size=4)
    return run_nightly(NightlyConfig(root=str(root), embed=embed, run_id=run_id, index=IndexConfig(index_type="flat")))


@pytest.mark.slow
def test_an_undecodable_name_is_embedded_and_reused_by_its_marker_next_night(tmp_path):
    corpus, root = tmp_path / "corpus", tmp_path / "root"
    corpus.mkdir()
    for i, name in enumerate(["chelsea", "coffee", "rocket"]):
        write(corpus / f"{name}.png", png(i, name))
    odd = bytes(corpus) + b"/" + ODD
    write(odd, png(9, "camera"))

    first = nightly(corpus, root, "r1")
    assert first["counts"] == {"seen": 4, "embedded": 4, "reused": 0, "reused_by_marker": 0, "failed": 0, "deleted": 0}
    rows = {r["id"]: r for r in read_dir(root / "runs/r1/embeddings").to_pylist()}
    assert rows[ODD_ID]["uri"] == f"{corpus}/{ODD_ID}"
    assert rows[ODD_ID]["source_marker"] == marker_of(odd)

    # Same size, old mtime, garbage bytes: only reading the file could tell.
    st = os.stat(odd)
    write(odd, bytes(np.random.default_rng(0).integers(0, 256, st.st_size, dtype=np.uint8)), st.st_mtime)
    second = nightly(corpus, root, "r2")
    assert second["counts"]["reused_by_marker"] == second["counts"]["reused"] == 4
    assert second["counts"]["failed"] == 0
    assert np.array_equal(embeddings_by_id(root / "runs/r2")[ODD_ID], embeddings_by_id(root / "runs/r1")[ODD_ID])


# -- FIFOs, sockets, devices ---------------------------------------------------------------------


def test_only_regular_files_are_handed_on_from_the_listing(tmp_path):
    write(tmp_path / "good.png", png(1))
    os.mkfifo(tmp_path / "pipe.jpg")
    (tmp_path / "null.png").symlink_to("/dev/null")
    os.mkfifo(tmp_path / "pipe.txt")  # not an image name: not listed, not a row
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(tmp_path / "sock.jpeg"))
        files, rows = split(list(ListFilesFn(str(tmp_path)).process(f"{tmp_path}/**")))
    assert [m.path for m in files] == [f"{tmp_path}/good.png"]
    got = {r["id"]: (r["error"], r["message"]) for r in rows}
    assert got == {
        "pipe.jpg": (reasons.UNREADABLE, f"NotRegularFileError: {tmp_path}/pipe.jpg is a FIFO (named pipe), " + TAIL),
        "null.png": (reasons.UNREADABLE, f"NotRegularFileError: {tmp_path}/null.png is a character device, " + TAIL),
        "sock.jpeg": (reasons.UNREADABLE, f"NotRegularFileError: {tmp_path}/sock.jpeg is a socket, " + TAIL),
    }


TAIL = "not a regular file; only regular files are read"


def with_deadline(call, fifo: pathlib.Path, seconds: float = 20.0) -> list:
    """call() in a thread; if it is still blocked on the FIFO after `seconds`, unblock it and fail."""
    out: list = []
    worker = threading.Thread(target=lambda: out.extend(call()), daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # a writer lets the blocked open return
        os.close(fd)
        worker.join(seconds)
        pytest.fail(f"blocked for {seconds} s on the FIFO {fifo}")
    return out


def test_a_file_swapped_for_a_fifo_after_listing_is_refused_not_waited_on(tmp_path):
    path = tmp_path / "x.jpg"
    write(path, png(1))
    (meta,) = list(list_local(str(path)))
    path.unlink()
    os.mkfifo(path)
    images, rows = split(with_deadline(lambda: list(ReadFileFn(str(tmp_path), 1_000_000).process(meta)), path))
    assert images == []
    assert [(r["id"], r["error"]) for r in rows] == [("x.jpg", reasons.UNREADABLE)]
    assert "is a FIFO (named pipe), not a regular file" in rows[0]["message"]


# -- files that change ---------------------------------------------------------------------------


def test_the_marker_describes_the_bytes_read_when_the_file_changed_after_listing(tmp_path):
    path = tmp_path / "grown.png"
    write(path, png(1))
    (listed,) = list(list_local(str(path)))
    write(path, png(2) + b"\0" * 100, OLD + 50)  # rewritten, larger, before it is read
    (image,) = ReadFileFn(str(tmp_path), 1_000_000).process(listed)
    assert image.data == path.read_bytes()
    assert image.marker == marker_of(path) != change_marker(listed)
    # So next night's listing matches the stored marker: the file is trusted, not read again.
    (tonight,) = list(list_local(str(path)))
    assert change_marker(tonight) == image.marker

    write(path, png(3))  # rewritten just now: a later rewrite could keep its marker, so none
    os.utime(path, (time.time(), time.time()))
    (image,) = ReadFileFn(str(tmp_path), 1_000_000).process(listed)
    assert image.data == path.read_bytes() and image.marker is None

    small = tmp_path / "small.png"
    write(small, bytes(10))
    (listed,) = list(list_local(str(small)))
    write(small, bytes(2_000), OLD + 60)  # grown past --max-bytes since the listing
    (row,) = split(list(ReadFileFn(str(tmp_path), 1_000).process(listed)))[1]
    assert (row["error"], row["message"]) == (reasons.TOO_LARGE, "2,000 bytes exceeds the limit of 1,000 (--max-bytes)")


def test_a_file_that_changes_while_it_is_read_is_an_unreadable_row(tmp_path, monkeypatch):
    path = tmp_path / "growing.png"
    write(path, png(1))
    (listed,) = list(list_local(str(path)))
    inode = os.stat(path).st_ino
    real_fstat, calls = os.fstat, []

    def fstat(fd):
        # A writer appends right after the reader took the file's stat and before it reads.
        st = real_fstat(fd)
        if st.st_ino == inode:
            calls.append(st.st_size)
            if len(calls) == 2:
                with open(path, "ab") as f:
                    f.write(b"more")
        return st

    monkeypatch.setattr(os, "fstat", fstat)
    images, rows = split(list(ReadFileFn(str(tmp_path), 1_000_000).process(listed)))
    monkeypatch.undo()
    assert images == [] and len(calls) >= 2
    assert [(r["id"], r["error"]) for r in rows] == [("growing.png", reasons.UNREADABLE)]
    assert rows[0]["message"].startswith(f"{FileChangedError.__name__}: {path} changed while it was read")


# -- symlinked folders ---------------------------------------------------------------------------


def test_symlinked_folders_are_followed_once_and_loops_are_one_row(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "a").mkdir(parents=True)
    (root / "b" / "c").mkdir(parents=True)
    (outside / "inner").mkdir(parents=True)
    write(root / "a" / "1.png", png(1))
    write(outside / "2.png", png(2))
    write(outside / "inner" / "3.png", png(3))
    (root / "alias").symlink_to(root / "a")  # a second path to a folder listed anyway
    (root / "b" / "c" / "loop").symlink_to(root / "b")  # a loop
    (root / "ext").symlink_to(outside)  # outside the root: followed
    (root / "ext2").symlink_to(outside)  # and not twice
    (root / "file.png").symlink_to(root / "a" / "1.png")  # links to files are followed as before
    (root / "gone.png").symlink_to(root / "nowhere.png")
    files, rows = split(list(ListFilesFn(str(root)).process(f"{root}/**")))
    assert sorted(relative_id(str(root), m.path) for m in files) == [
        "a/1.png",
        "ext/2.png",
        "ext/inner/3.png",
        "file.png",
    ]
    got = {r["id"]: (r["error"], r["message"]) for r in rows}
    assert got.pop("gone.png")[0] == reasons.UNREADABLE
    assert got == {
        "alias": (
            reasons.UNREADABLE,
            f"ListingError: {root}/alias (-> {root}/a) is the folder already listed as {root}/a; "
            "its files are listed once, there",
        ),
        "b/c/loop": (
            reasons.UNREADABLE,
            f"ListingError: {root}/b/c/loop (-> {root}/b) is a folder that contains it, {root}/b (a link loop); "
            "not followed",
        ),
        "ext2": (
            reasons.UNREADABLE,
            f"ListingError: {root}/ext2 (-> {outside}) is the folder already listed as {root}/ext; "
            "its files are listed once, there",
        ),
    }


def test_a_hostile_tree_is_read_whole_without_hanging(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    write(root / "good.png", png(1))
    write(outside / "more.png", png(2))
    (root / "ext").symlink_to(outside)
    (root / "self").symlink_to(root)
    os.mkfifo(root / "pipe.jpg")
    seen = run_read(
        str(root),
        images=[("good.png", f"{root}/good.png"), ("ext/more.png", f"{root}/ext/more.png")],
        errors=[("pipe.jpg", f"{root}/pipe.jpg", reasons.UNREADABLE), ("self", f"{root}/self", reasons.UNREADABLE)],
    )
    assert seen == 4  # every row counts: seen == embedded + reused + failed


# -- inputs without a single image ---------------------------------------------------------------


def test_an_input_without_images_is_an_empty_input_row_that_says_what_it_found(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    for i in range(4):
        (shards / f"train.tfrecord-{i:05d}-of-00004").write_bytes(b"x")
    (shards / "README").write_text("no extension")
    seen = run_read(
        InputSpec(paths=(str(shards),), format="files"),
        images=[],
        errors=[(f"{shards}/", f"{shards}/**", reasons.EMPTY_INPUT)],
    )
    assert seen == 1
    (row,) = split(list(ListFilesFn(str(shards)).process(f"{shards}/**")))[1]
    assert row["message"] == (
        f"{shards}/**: 5 files, none with an image extension (.tfrecord-00000-of-00004: 4, (no extension): 1); "
        "did you mean --input-format tfrecord?"
    )


def test_empty_and_missing_folders_say_so(tmp_path):
    (tmp_path / "empty").mkdir()
    (row,) = split(list(ListFilesFn(str(tmp_path)).process(f"{tmp_path}/empty/**")))[1]
    assert (row["id"], row["error"], row["message"]) == (
        f"{tmp_path}/empty/",
        reasons.EMPTY_INPUT,
        f"{tmp_path}/empty/**: no files at all",
    )
    (row,) = split(list(ListFilesFn(str(tmp_path)).process(f"{tmp_path}/missing/*.jpg")))[1]
    assert row["message"] == f"{tmp_path}/missing/*.jpg: no files at all ({tmp_path}/missing does not exist)"
    write(tmp_path / "empty" / "a.png", png(1))
    files, rows = split(list(ListFilesFn(str(tmp_path)).process(f"{tmp_path}/empty/**")))
    assert len(files) == 1 and rows == []
