"""Change markers: a nightly rerun skips reading files whose size and mtime are unchanged.

Real Beam (FnApiRunner), real Parquet, real FAISS. The proof that an unchanged file
is not read: its bytes are replaced by same-size garbage with the old mtime restored
(works as root, where chmod 000 would not stop a read). Trusting the marker, the
rerun reuses the old embedding; with verify_content the garbage is read and fails to
decode. On an object-store path (a fake `fakegcs://` filesystem: only the boundary is
faked) every open is counted: an unchanged rerun opens no image at all.
"""

from __future__ import annotations

import os
import pathlib
import time
from typing import ClassVar

import numpy as np
import pyarrow.parquet as pq
import pytest
from apache_beam.io.filesystem import FileMetadata, MatchResult
from apache_beam.io.filesystems import FileSystems
from apache_beam.io.localfilesystem import LocalFileSystem
from embed_helpers import embeddings_by_id, errors_by_id, read_dir
from odd_images import encode, photo
from PIL import Image

from pipeline import reasons
from pipeline.config import EmbedConfig, IndexConfig, ModelConfig
from pipeline.formats.files import ListFilesFn, change_marker, list_local
from pipeline.nightly import NightlyConfig, run_nightly

pytestmark = pytest.mark.slow

OLD = 1_700_000_000  # the corpus' mtimes: well in the past, so every file gets a marker
NAMES = ["astronaut", "chelsea", "coffee", "rocket", "camera", "brick"]


def make_image(path: pathlib.Path, name: str, seed: int, mtime: float) -> None:
    rng = np.random.default_rng(seed)
    img = np.asarray(photo((40, 36), name)).astype(np.int16) + rng.integers(-30, 30, (36, 40, 3))
    path.write_bytes(encode(Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)), "PNG"))
    os.utime(path, (mtime, mtime))


def make_corpus(folder: pathlib.Path) -> pathlib.Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(NAMES):
        make_image(folder / f"{name}.png", name, i, OLD + i)
    return folder


def nightly(corpus: str, root, run_id: str, **kw) -> dict:
    embed = EmbedConfig(input=str(corpus), output="", model=ModelConfig(image_size=32, weights="random"), batch_size=4)
    return run_nightly(
        NightlyConfig(root=str(root), embed=embed, run_id=run_id, index=IndexConfig(index_type="flat"), **kw)
    )


def markers(root, run_id: str) -> dict[str, str | None]:
    table = read_dir(pathlib.Path(root) / "runs" / run_id / "embeddings")
    return dict(zip(table.column("id").to_pylist(), table.column("source_marker").to_pylist(), strict=True))


def marker_of(path: pathlib.Path) -> str:
    st = os.stat(path)
    return f"size={st.st_size};mtime={st.st_mtime!r}"


def replace_keeping_marker(path: pathlib.Path, data: bytes) -> None:
    """New content of the same size, old mtime restored: only reading the bytes can tell."""
    st = os.stat(path)
    assert len(data) == st.st_size
    path.write_bytes(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert marker_of(path) == f"size={st.st_size};mtime={st.st_mtime!r}"


def test_local_listing_gives_the_metadata_of_beam_filesystems(tmp_path):
    corpus = make_corpus(tmp_path / "c")
    ours = {m.path: m for m in list_local(f"{corpus}/**")}
    beams = {m.path: m for m in FileSystems.match([f"{corpus}/**"])[0].metadata_list}
    assert ours == beams and len(ours) == len(NAMES)  # FileMetadata == compares path, size, mtime
    for meta in ours.values():
        assert change_marker(meta) == marker_of(pathlib.Path(meta.path))
    assert change_marker(FileMetadata("gs://b/x.jpg", 10)) is None  # a filesystem without mtimes: no marker


@pytest.fixture(scope="module")
def local_runs(tmp_path_factory):
    """r1 full; then garbage behind an unchanged marker, a touched copy, a real change, a racy file; r2; r3 verify."""
    base = tmp_path_factory.mktemp("markers")
    corpus, root = make_corpus(base / "corpus"), base / "root"
    future = time.time() + 3600  # mtime not safely in the past: never trusted
    make_image(corpus / "racy.png", "grass", 50, future)
    first = nightly(corpus, root, "r1")
    before = {name: marker_of(corpus / f"{name}.png") for name in [*NAMES, "racy"]}

    rng = np.random.default_rng(7)
    chelsea = corpus / "chelsea.png"
    replace_keeping_marker(chelsea, rng.integers(0, 256, chelsea.stat().st_size, dtype=np.uint8).tobytes())
    os.utime(corpus / "coffee.png", (OLD + 100, OLD + 100))  # touched, same bytes
    make_image(corpus / "rocket.png", "rocket", 99, OLD + 200)  # new content, new mtime
    second = nightly(corpus, root, "r2")
    third = nightly(corpus, root, "r3", verify_content=True)
    return corpus, root, before, first, second, third


def test_every_row_records_the_marker_of_the_file_it_was_read_from(local_runs):
    _, root, before, first, *_ = local_runs
    assert first["counts"] == {
        "seen": 7,
        "embedded": 7,
        "reused": 0,
        "reused_by_marker": 0,
        "failed": 0,
        "deleted": 0,
    }
    got = markers(root, "r1")
    assert got == {f"{n}.png": before[n] for n in NAMES} | {"racy.png": None}  # racy: modified "just now"


def test_unchanged_marker_is_trusted_without_reading_the_file(local_runs):
    corpus, root, _, _, second, _ = local_runs
    # chelsea (garbage behind its old marker), astronaut, camera, brick: by marker, never read;
    # coffee (touched) and racy (no marker): read and reused by hash; rocket: re-embedded.
    assert second["counts"] == {
        "seen": 7,
        "embedded": 1,
        "reused": 6,
        "reused_by_marker": 4,
        "failed": 0,
        "deleted": 0,
    }
    assert second["validated"] is True and second["verify_content"] is False
    old, new = embeddings_by_id(root / "runs/r1"), embeddings_by_id(root / "runs/r2")
    assert np.array_equal(new["chelsea.png"], old["chelsea.png"])  # the garbage was never looked at
    assert np.array_equal(new["coffee.png"], old["coffee.png"])
    assert not np.array_equal(new["rocket.png"], old["rocket.png"])
    got = markers(root, "r2")
    # Reused rows carry the file's current marker: coffee's new mtime, so it is skipped next time.
    assert got["coffee.png"] == marker_of(corpus / "coffee.png") != markers(root, "r1")["coffee.png"]
    assert got["rocket.png"] == marker_of(corpus / "rocket.png")
    assert got["chelsea.png"] == marker_of(corpus / "chelsea.png")
    assert got["racy.png"] is None
    # Carried rows are the old rows (vector, hash, timestamp); only the marker is current.
    r1 = {r["id"]: r for r in read_dir(root / "runs/r1/embeddings").to_pylist()}
    r2 = {r["id"]: r for r in read_dir(root / "runs/r2/embeddings").to_pylist()}
    for rid in ("chelsea.png", "coffee.png", "astronaut.png"):
        assert {k: v for k, v in r2[rid].items() if k not in ("source_marker", "embedding")} == {
            k: v for k, v in r1[rid].items() if k not in ("source_marker", "embedding")
        }


def test_verify_content_reads_every_file(local_runs):
    _, root, _, _, _, third = local_runs
    # Same files as r2, but every one is read: the garbage behind chelsea's marker is found.
    assert third["counts"] == {
        "seen": 7,
        "embedded": 0,
        "reused": 6,
        "reused_by_marker": 0,
        "failed": 1,
        "deleted": 0,
    }
    assert third["verify_content"] is True
    assert errors_by_id(root / "runs/r3")["chelsea.png"]["error"] == reasons.NOT_AN_IMAGE
    assert "chelsea.png" not in embeddings_by_id(root / "runs/r3")


def test_a_run_without_marker_columns_is_read_and_hashed_then_markers_take_over(tmp_path):
    corpus, root = make_corpus(tmp_path / "corpus"), tmp_path / "root"
    nightly(corpus, root, "r1")
    # Make r1 look like a run from before markers existed: no source_marker column at all.
    for path in (root / "runs/r1/embeddings").glob("*.parquet"):
        table = pq.read_table(path)
        pq.write_table(table.drop_columns(["source_marker"]), path)
    second = nightly(corpus, root, "r2")
    assert second["counts"]["reused"] == len(NAMES) and second["counts"]["reused_by_marker"] == 0
    assert markers(root, "r2") == {f"{n}.png": marker_of(corpus / f"{n}.png") for n in NAMES}
    third = nightly(corpus, root, "r3")
    assert third["counts"]["reused"] == third["counts"]["reused_by_marker"] == len(NAMES)
    assert embeddings_by_id(root / "runs/r3").keys() == embeddings_by_id(root / "runs/r1").keys()


class FakeGcs(LocalFileSystem):
    """`fakegcs://PATH` served from a local folder, counting every open: only the object store is faked.

    Listing returns what GCS listing does through Beam (path, size, `updated` seconds);
    our code reaches it through FileSystems exactly as it reaches gs://.
    """

    root = "/nonexistent"
    prefix = "fakegcs://"
    opened: ClassVar[list[str]] = []  # paths opened, in order (the test resets it)

    @classmethod
    def scheme(cls) -> str:
        return "fakegcs"

    def _local(self, path: str) -> str:
        return os.path.join(self.root, path[len(self.prefix) :]) if path.startswith(self.prefix) else path

    def join(self, basepath: str, *paths: str) -> str:
        return "/".join([basepath.rstrip("/"), *paths])

    def match(self, patterns, limits=None):
        out = []
        for pattern, result in zip(patterns, super().match([self._local(p) for p in patterns], limits), strict=True):
            found = [
                FileMetadata(
                    self.prefix + os.path.relpath(m.path, self.root), m.size_in_bytes, m.last_updated_in_seconds
                )
                for m in result.metadata_list
            ]
            out.append(MatchResult(pattern, found))
        return out

    def open(self, path, mime_type="application/octet-stream", compression_type="auto"):
        FakeGcs.opened.append(path)
        return super().open(self._local(path), mime_type, compression_type)


def test_object_store_listing_gives_markers_and_unchanged_objects_are_never_opened(tmp_path):
    make_corpus(tmp_path / "bucket" / "images")
    FakeGcs.root = str(tmp_path / "bucket")
    listed = list(ListFilesFn("fakegcs://images").process("fakegcs://images/**"))
    assert {m.path for m in listed} == {f"fakegcs://images/{n}.png" for n in NAMES}
    for meta in listed:
        assert change_marker(meta) == marker_of(tmp_path / "bucket" / meta.path[len("fakegcs://") :])

    root = tmp_path / "root"
    del FakeGcs.opened[:]
    nightly("fakegcs://images", root, "r1")
    assert sorted(FakeGcs.opened) == sorted(m.path for m in listed)  # the full run reads each object once
    del FakeGcs.opened[:]
    second = nightly("fakegcs://images", root, "r2")
    assert FakeGcs.opened == []  # nothing opened: every object skipped on its listing entry
    assert second["counts"]["reused_by_marker"] == second["counts"]["reused"] == len(NAMES)
    third = nightly("fakegcs://images", root, "r3", verify_content=True)
    assert sorted(FakeGcs.opened) == sorted(m.path for m in listed)
    assert third["counts"]["reused"] == len(NAMES) and third["counts"]["reused_by_marker"] == 0
