"""The `files` format: a directory or glob of image files, one file per image."""

from __future__ import annotations

import hashlib
import os
import time

import apache_beam as beam
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from shard_fixtures import make_images

from pipeline import reasons
from pipeline.read import InputSpec, ReadImages, relative_id, resolve_input


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read(spec, *, max_bytes: int, images: list, errors: list) -> int:
    """Run ReadImages; assert (id, uri, sha) images and (id, uri, error) rows; return images_seen."""
    p = TestPipeline(runner="FnApiRunner")
    read = p | "ReadImages" >> ReadImages(spec, max_bytes=max_bytes)
    got = read["images"] | "ProjectImages" >> beam.Map(lambda im: (im.id, im.uri, sha(im.data), im.meta))
    assert_that(got, equal_to([(*i, None) for i in images]), label="Images")
    bad = read["errors"] | "ProjectErrors" >> beam.Map(lambda e: (e["id"], e["uri"], e["error"]))
    assert_that(bad, equal_to(errors), label="Errors")
    result = p.run()
    result.wait_until_finish()
    found = result.metrics().query(MetricsFilter().with_namespace("embedpipe").with_name("images_seen"))["counters"]
    return sum(c.committed for c in found)


LIMIT = 200_000  # --max-bytes of these tests: the small JPEGs fit, big.png does not


@pytest.fixture()
def corpus(tmp_path):
    images = make_images(3, seed=21)
    names = sorted(images)
    assert max(len(d) for d in images.values()) < LIMIT
    root = tmp_path / "corpus"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / f"{names[0]}.jpg").write_bytes(images[names[0]])
    (root / "sub" / f"{names[1]}.JPG").write_bytes(images[names[1]])  # extensions are case-insensitive
    (root / "sub" / "deeper" / f"{names[2]}.jpeg").write_bytes(images[names[2]])
    (root / "big.png").write_bytes(b"\x89PNG" + bytes(LIMIT))  # over the limit: never read
    (root / "notes.txt").write_text("not an image: not listed")
    (root / "sub" / "gone.jpg").symlink_to(root / "does-not-exist.jpg")  # a broken link
    return root, images, names


def test_directory_is_listed_recursively_with_ids_relative_to_it(corpus):
    root, images, names = corpus
    seen = _read(
        str(root),
        max_bytes=LIMIT,
        images=[
            (f"{names[0]}.jpg", f"{root}/{names[0]}.jpg", sha(images[names[0]])),
            (f"sub/{names[1]}.JPG", f"{root}/sub/{names[1]}.JPG", sha(images[names[1]])),
            (f"sub/deeper/{names[2]}.jpeg", f"{root}/sub/deeper/{names[2]}.jpeg", sha(images[names[2]])),
        ],
        errors=[
            ("big.png", f"{root}/big.png", reasons.TOO_LARGE),
            ("sub/gone.jpg", f"{root}/sub/gone.jpg", reasons.UNREADABLE),
        ],
    )
    assert seen == 5  # every image file is one image or one error row


def test_glob_and_single_file_inputs(corpus):
    root, images, names = corpus
    first = f"{root}/{names[0]}.jpg"
    _read(
        InputSpec(paths=(f"{root}/sub/*/*.jpeg", first), format="files"),
        max_bytes=LIMIT,
        images=[
            (f"sub/deeper/{names[2]}.jpeg", f"{root}/sub/deeper/{names[2]}.jpeg", sha(images[names[2]])),
            (f"{names[0]}.jpg", first, sha(images[names[0]])),
        ],
        errors=[],
    )


def test_resolve_input_and_relative_ids(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.jpg").write_bytes(b"x")
    assert resolve_input(str(tmp_path / "d")) == (str(tmp_path / "d"), f"{tmp_path}/d/**")
    assert resolve_input(f"{tmp_path}/d/") == (str(tmp_path / "d"), f"{tmp_path}/d/**")
    assert resolve_input(f"{tmp_path}/d/a.jpg") == (str(tmp_path / "d"), f"{tmp_path}/d/a.jpg")
    assert resolve_input("gs://b/photos/*/x*.jpg") == ("gs://b/photos", "gs://b/photos/*/x*.jpg")
    assert resolve_input("gs://b/photos") == ("gs://b/photos", "gs://b/photos/**")
    assert relative_id("gs://b/photos", "gs://b/photos/cats/1.jpg") == "cats/1.jpg"
    assert relative_id(str(tmp_path), f"{tmp_path}/d/a.jpg") == "d/a.jpg"


def test_unchanged_markers_skip_the_read_and_read_files_carry_their_marker(tmp_path):
    """With the previous run's markers, a file whose size+mtime match is not read: it goes to "unchanged"."""
    images = make_images(4, seed=5)
    names = sorted(images)
    root = tmp_path / "corpus"
    root.mkdir()
    for i, name in enumerate(names):
        (root / f"{name}.jpg").write_bytes(images[name])
        os.utime(root / f"{name}.jpg", (1_700_000_000 + i, 1_700_000_000 + i))
    # Modified less than RACY_SECONDS before it is read (here: mtime ahead of the clock, so the test
    # does not depend on how fast the pipeline starts): a rewrite could keep its marker, so it gets none.
    racy = root / "racy.jpg"
    racy.write_bytes(images[names[0]])
    os.utime(racy, (time.time() + 3600, time.time() + 3600))
    marker = {n: f"size={len(images[n])};mtime={float(1_700_000_000 + i)!r}" for i, n in enumerate(names)}
    previous = [
        (f"{names[0]}.jpg", marker[names[0]]),  # unchanged: skipped
        (f"{names[1]}.jpg", marker[names[1]]),  # unchanged: skipped
        (f"{names[2]}.jpg", marker[names[2]].replace("mtime=", "mtime=1")),  # touched since: read
        ("racy.jpg", f"size={racy.stat().st_size};mtime=1.0"),  # changed: read
        # names[3]: new, no previous marker: read
    ]
    p = TestPipeline(runner="FnApiRunner")
    markers = p | "Previous" >> beam.Create(previous)
    read = p | "ReadImages" >> ReadImages(str(root), max_bytes=LIMIT, previous_markers=markers)
    got = read["images"] | "ProjectImages" >> beam.Map(lambda im: (im.id, sha(im.data), im.marker))
    assert_that(
        got,
        equal_to(
            [
                (f"{names[2]}.jpg", sha(images[names[2]]), marker[names[2]]),
                (f"{names[3]}.jpg", sha(images[names[3]]), marker[names[3]]),
                ("racy.jpg", sha(images[names[0]]), None),
            ]
        ),
        label="Read",
    )
    assert_that(read["unchanged"], equal_to(previous[:2]), label="Unchanged")
    result = p.run()
    result.wait_until_finish()

    def counter(name: str) -> int:
        found = result.metrics().query(MetricsFilter().with_namespace("embedpipe").with_name(name))["counters"]
        return sum(c.committed for c in found)

    assert counter("images_seen") == 5  # skipped files are seen too: seen == embedded + reused + failed
    assert counter("images_reused_by_marker") == counter("images_reused") == 2
