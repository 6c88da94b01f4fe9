"""Shard readers (tar, TFRecord, Parquet, URI lists) and the input spec, stage by stage.

Pipelines run on the real FnApiRunner (TestPipeline + assert_that); damage is
made by cutting or flipping bytes of shards written by the real tools.
"""

from __future__ import annotations

import argparse
import hashlib
import tarfile

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from shard_fixtures import (
    image_examples,
    make_images,
    meta_json,
    tf_example,
    write_csv_list,
    write_files,
    write_parquet,
    write_tar,
    write_text_list,
    write_tfrecord,
)

from pipeline import reasons
from pipeline.formats import CORRUPT_RECORD, TRUNCATED_SHARD, detect_format
from pipeline.formats.example_proto import ExampleParseError, parse_example
from pipeline.formats.parquet import read_parquet
from pipeline.formats.tar import read_tar
from pipeline.formats.tfrecord import encode_frame, read_tfrecord
from pipeline.options.embedding import add_input_options, input_spec
from pipeline.read import InputSpec, ReadImages, split_paths
from pipeline.records import SourceImage

MAX_BYTES = 10_000_000


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def images() -> dict[str, bytes]:
    return make_images(6, seed=11)


def run_read(spec, *, max_bytes: int = MAX_BYTES, images=None, errors=None, messages=None) -> dict:
    """ReadImages on the FnApiRunner; asserts the (id, uri, sha, meta) images and (id, uri, error) rows.

    `messages` maps an error id to a text its message must contain. Returns the counters.
    """
    p = TestPipeline(runner="FnApiRunner")
    read = p | "ReadImages" >> ReadImages(spec, max_bytes=max_bytes)
    if images is not None:
        got = read["images"] | "ProjectImages" >> beam.Map(lambda im: (im.id, im.uri, sha(im.data), im.meta))
        assert_that(got, equal_to(images), label="Images")
    if errors is not None:
        got = read["errors"] | "ProjectErrors" >> beam.Map(lambda e: (e["id"], e["uri"], e["error"]))
        assert_that(got, equal_to(errors), label="Errors")
    if messages:

        def check(rows):
            found = {r["id"]: r["message"] for r in rows}
            for rid, text in messages.items():
                assert text in found[rid], (rid, found.get(rid))

        assert_that(read["errors"], check, label="Messages")
    result = p.run()
    result.wait_until_finish()
    totals: dict[str, int] = {}
    for counter in result.metrics().query(MetricsFilter().with_namespace("embedpipe"))["counters"]:
        totals[counter.key.metric.name] = totals.get(counter.key.metric.name, 0) + counter.committed  # over steps
    return totals


# ---------------------------------------------------------------- input spec


@pytest.mark.parametrize(
    ("name", "fmt"),
    [
        ("gs://b/shards/00001.tar", "tar"),
        ("x/a.TAR.GZ", "tar"),
        ("a.tgz", "tar"),
        ("train.tfrecord", "tfrecord"),
        ("train.tfrecords.gz", "tfrecord"),
        ("train.tfrecord-00003-of-00010", "tfrecord"),
        ("part-0.parquet", "parquet"),
        ("list.txt", "urilist"),
        ("list.csv", "urilist"),
        ("shards/*.tar", "tar"),
        ("photos/", None),
        ("photos/cat.jpg", None),
        ("photos/**", None),
    ],
)
def test_detect_format_from_the_name(name, fmt):
    assert detect_format(name) == fmt


def test_input_spec_resolves_formats_and_the_id_root(tmp_path):
    (tmp_path / "photos").mkdir()
    spec = InputSpec(paths=(str(tmp_path / "photos"), f"{tmp_path}/shards/*.tar", f"{tmp_path}/pq/a.parquet"))
    assert spec.sources() == [
        (str(tmp_path / "photos"), "files"),
        (f"{tmp_path}/shards/*.tar", "tar"),
        (f"{tmp_path}/pq/a.parquet", "parquet"),
    ]
    assert spec.root() == str(tmp_path)
    assert spec.ids_may_repeat() and spec.carries_meta()
    only_files = InputSpec.of(str(tmp_path / "photos"))
    assert only_files.root() == str(tmp_path / "photos")
    assert not only_files.ids_may_repeat() and not only_files.carries_meta()
    assert InputSpec(paths="gs://b/x/*.parquet").root() == "gs://b/x"
    assert InputSpec(paths=("gs://b/x/a.tar", "gs://b/y/b.tar")).root() == "gs://b"
    assert InputSpec(paths=(f"{tmp_path}/shards",), format="urilist").sources() == [(f"{tmp_path}/shards", "urilist")]
    (tmp_path / "table.parquet").mkdir()  # Spark writes a Parquet "file" as a directory of parts
    assert InputSpec(paths=str(tmp_path / "table.parquet")).sources() == [(str(tmp_path / "table.parquet"), "parquet")]
    assert InputSpec(paths=str(tmp_path / "table.parquet")).root() == str(tmp_path / "table.parquet")


def test_input_spec_rejects_what_it_cannot_read():
    with pytest.raises(ValueError, match="input format"):
        InputSpec(paths="a", format="zip")
    with pytest.raises(ValueError, match="compression"):
        InputSpec(paths="a.tfrecord", tfrecord_compression="zstd")
    with pytest.raises(ValueError, match="non-empty"):
        InputSpec(paths=())


def test_split_paths_keeps_existing_names_whole(tmp_path):
    odd = tmp_path / "a,b"
    odd.mkdir()
    assert split_paths("x.tar, y/*.tar") == ("x.tar", "y/*.tar")
    assert split_paths(str(odd)) == (str(odd),)


def test_cli_options_build_the_spec():
    parser = argparse.ArgumentParser()
    add_input_options(parser, required=False)
    args = parser.parse_args(
        [
            *("--input", "a.tfrecord,b.tfrecord", "--input-format", "tfrecord", "--tfrecord-key", "image/filename"),
            *("--tfrecord-compression", "gzip", "--parquet-image-column", "png", "--urilist-id-column", "name"),
        ]
    )
    spec = input_spec(args)
    assert spec == InputSpec(
        paths=("a.tfrecord", "b.tfrecord"),
        format="tfrecord",
        tfrecord_key="image/filename",
        tfrecord_compression="gzip",
        parquet_image_column="png",
        urilist_id_column="name",
    )
    assert spec.to_dict()["paths"] == ["a.tfrecord", "b.tfrecord"]
    defaults = input_spec(parser.parse_args(["--input", "d"]))
    assert (defaults.format, defaults.parquet_id_column, defaults.tfrecord_key) == ("auto", "key", "image/id")


# ---------------------------------------------------------------- tar


def test_tar_samples_are_grouped_by_key_with_meta(tmp_path, images):
    items = list(images.items())
    shards = tmp_path / "shards"
    write_tar(
        shards / "a.tar",
        [(k, d) for k, d in items[:3]] + [(f"sub/{items[3][0]}", items[3][1])],
        meta={items[0][0]: meta_json(caption="a cat"), items[1][0]: "txt:plain caption"},
        extra={f"{items[2][0]}.cls": b"3", "orphan.json": b"{}"},
    )
    write_tar(shards / "b.tar.gz", items[4:], mode="w:gz", meta={items[4][0]: "txt:gz"})
    (shards / "README.md").write_text("not a shard")  # skipped: the directory is read as tar shards
    a, b = f"{shards}/a.tar", f"{shards}/b.tar.gz"
    expected = [
        (f"a.tar/{items[0][0]}", f"{a}#{items[0][0]}.jpg", sha(items[0][1]), '{"caption": "a cat"}'),
        (f"a.tar/{items[1][0]}", f"{a}#{items[1][0]}.jpg", sha(items[1][1]), "plain caption"),
        (f"a.tar/{items[2][0]}", f"{a}#{items[2][0]}.jpg", sha(items[2][1]), None),
        (f"a.tar/sub/{items[3][0]}", f"{a}#sub/{items[3][0]}.jpg", sha(items[3][1]), None),
        (f"b.tar.gz/{items[4][0]}", f"{b}#{items[4][0]}.jpg", sha(items[4][1]), "gz"),
        (f"b.tar.gz/{items[5][0]}", f"{b}#{items[5][0]}.jpg", sha(items[5][1]), None),
    ]
    counters = run_read(InputSpec(paths=str(shards), format="tar"), images=expected, errors=[])
    assert counters["images_seen"] == 6


def test_tar_member_over_max_bytes_is_an_error_row_and_is_not_read(tmp_path, images):
    items = sorted(images.items(), key=lambda kv: len(kv[1]))
    small, big = items[0], items[-1]
    shard = write_tar(tmp_path / "s.tar", [big, small])
    out = list(read_tar(str(shard), "s.tar", max_bytes=len(small[1])))
    assert [(o.id, sha(o.data)) for o in out if isinstance(o, SourceImage)] == [(f"s.tar/{small[0]}", sha(small[1]))]
    assert [(o["id"], o["uri"], o["error"]) for o in out if isinstance(o, dict)] == [
        (f"s.tar/{big[0]}", f"{shard}#{big[0]}.jpg", reasons.TOO_LARGE)
    ]


@pytest.mark.parametrize("mode", ["w", "w:gz"])
def test_tar_cut_anywhere_keeps_every_whole_image_and_reports_the_cut(tmp_path, images, mode):
    items = list(images.items())[:4]
    shard = write_tar(tmp_path / "full.tar", items, meta={k: meta_json(n=i) for i, (k, _) in enumerate(items)})
    with tarfile.open(shard) as archive:
        ends = [m.offset_data + m.size for m in archive.getmembers() if m.name.endswith(".jpg")]
        archive_end = archive.offset  # where the end-of-archive block starts
    raw = shard.read_bytes()
    if mode == "w:gz":  # cut the compressed stream; offsets are then in the decompressed tar
        shard = write_tar(tmp_path / "full.tar.gz", items, mode="w:gz")
        raw = shard.read_bytes()
    cut_path = tmp_path / ("cut.tar.gz" if mode == "w:gz" else "cut.tar")
    for cut in range(0, len(raw), 97 if mode == "w" else 61):
        cut_path.write_bytes(raw[:cut])
        out = list(read_tar(str(cut_path), "cut", max_bytes=MAX_BYTES))
        got = [o.id for o in out if isinstance(o, SourceImage)]
        damage = [o for o in out if not isinstance(o, SourceImage)]
        assert got == [f"cut/{k}" for k, _ in items[: len(got)]], cut  # a prefix, in order
        assert [sha(o.data) for o in out if isinstance(o, SourceImage)] == [sha(d) for _, d in items[: len(got)]]
        if mode == "w":
            assert len(got) == sum(end <= cut for end in ends), cut  # every whole image, no other
        assert len(damage) == (1 if mode == "w:gz" or cut < archive_end + 512 else 0), cut
        for row in damage:
            assert row["error"] == TRUNCATED_SHARD and row["id"].startswith("cut#offset=")
            assert row["uri"] == f"{cut_path}#{row['id'].split('#')[1]}"


def test_unreadable_and_missing_shards_are_error_rows_and_are_counted(tmp_path, images):
    good = write_tar(tmp_path / "good.tar", list(images.items())[:1])
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"this is not a tar archive" * 40)
    missing = tmp_path / "missing.tar"
    key = next(iter(images))
    counters = run_read(
        InputSpec(paths=(str(good), str(junk), str(missing), f"{tmp_path}/nothing/*.tar")),
        images=[(f"good.tar/{key}", f"{good}#{key}.jpg", sha(images[key]), None)],
        errors=[
            ("junk.tar#offset=0", f"{junk}#offset=0", TRUNCATED_SHARD),
            ("missing.tar", str(missing), reasons.UNREADABLE),
            ("nothing/*.tar", f"{tmp_path}/nothing/*.tar", reasons.EMPTY_INPUT),
        ],
        messages={"junk.tar#offset=0": "not a readable tar", "nothing/*.tar": "no tar shards match"},
    )
    # Every input record is one image or one error row, and the job's check relies on this count.
    assert counters["images_seen"] == 1 + 3
    assert counters["images_failed_read"] == 3


# ---------------------------------------------------------------- tfrecord


def test_example_parser_agrees_with_tensorflow():
    import tensorflow as tf

    data = tf_example(
        {
            "image/encoded": b"\x00\xffbytes" * 100,
            "image/id": [b"first", b"second"],
            "image/class": [3, -7, 2**40],
            "image/score": [0.5, -1.25],
            "empty": [],
        }
    )
    ours = parse_example(data, {"image/encoded", "image/id", "image/class", "image/score", "absent"})
    theirs = tf.train.Example.FromString(data).features.feature
    assert ours["image/encoded"] == list(theirs["image/encoded"].bytes_list.value)
    assert ours["image/id"] == [b"first", b"second"]
    assert ours["image/class"] == list(theirs["image/class"].int64_list.value) == [3, -7, 2**40]
    assert ours["image/score"] == pytest.approx(list(theirs["image/score"].float_list.value))
    assert "absent" not in ours
    with pytest.raises(ExampleParseError):
        parse_example(data[: len(data) // 2], {"image/encoded"})


def test_frames_are_byte_identical_to_tensorflows_writer(tmp_path, images):
    examples = image_examples(list(images.items())[:3])
    path = write_tfrecord(tmp_path / "tf.tfrecord", examples)
    assert path.read_bytes() == b"".join(encode_frame(e) for e in examples)


def test_tfrecord_ids_uris_fallbacks_gzip_detection_and_bad_checksums(tmp_path, images):
    items = list(images.items())
    plain = write_tfrecord(
        tmp_path / "a.tfrecord", [*image_examples(items[:3]), tf_example({"image/encoded": items[3][1]})]
    )
    raw = bytearray(plain.read_bytes())
    raw[bytes(raw).index(items[1][1]) + 50] ^= 0xFF  # inside record 1's data; its length is intact
    plain.write_bytes(bytes(raw))
    # gzip'd without a .gz name: found from the first bytes
    zipped = write_tfrecord(
        tmp_path / "b.tfrecord", [*image_examples(items[4:6]), tf_example({"image/id": b"no-image"})], gzip=True
    )
    counters = run_read(
        InputSpec(paths=(str(plain), str(zipped))),
        images=[
            (items[0][0], f"{plain}#0", sha(items[0][1]), None),
            (items[2][0], f"{plain}#2", sha(items[2][1]), None),  # found past the bad record 1
            ("a.tfrecord#3", f"{plain}#3", sha(items[3][1]), None),  # no image/id: SHARD#INDEX
            (items[4][0], f"{zipped}#0", sha(items[4][1]), None),
            (items[5][0], f"{zipped}#1", sha(items[5][1]), None),
        ],
        errors=[("a.tfrecord#1", f"{plain}#1", CORRUPT_RECORD), ("no-image", f"{zipped}#2", reasons.EMPTY_FILE)],
        messages={"a.tfrecord#1": "checksum"},
    )
    assert counters["images_seen"] == 7


def test_tfrecord_key_feature_and_compression_are_configurable(tmp_path, images):
    items = list(images.items())[:2]
    path = write_tfrecord(tmp_path / "f.tfrecord.gz", image_examples(items, key_feature="image/filename"), gzip=True)
    out = list(read_tfrecord(str(path), "f", key_feature="image/filename", compression="gzip", max_bytes=MAX_BYTES))
    assert [(o.id, o.uri, sha(o.data)) for o in out] == [(k, f"{path}#{i}", sha(d)) for i, (k, d) in enumerate(items)]
    fallback = list(read_tfrecord(str(path), "f", compression="gzip", max_bytes=MAX_BYTES))  # image/id absent
    assert [o.id for o in fallback] == ["f#0", "f#1"]
    small = min(len(d) for _, d in items)
    limited = list(read_tfrecord(str(path), "f", key_feature="image/filename", max_bytes=small))
    assert [o.id if isinstance(o, SourceImage) else o["error"] for o in limited] == [
        k if len(d) <= small else reasons.TOO_LARGE for k, d in items
    ]


def test_tfrecord_cut_anywhere_keeps_whole_records_and_reports_the_cut(tmp_path, images):
    items = list(images.items())[:4]
    examples = image_examples(items)
    path = write_tfrecord(tmp_path / "full.tfrecord", examples)
    raw = path.read_bytes()
    ends, pos = [], 0
    for e in examples:
        pos += len(encode_frame(e))
        ends.append(pos)
    cut_path = tmp_path / "cut.tfrecord"
    for cut in [*range(0, len(raw), 89), *ends, 5, 13]:
        cut_path.write_bytes(raw[:cut])
        out = list(read_tfrecord(str(cut_path), "cut", compression="none", max_bytes=MAX_BYTES))
        whole = sum(end <= cut for end in ends)
        assert [o.id for o in out if isinstance(o, SourceImage)] == [k for k, _ in items[:whole]], cut
        damage = [o for o in out if not isinstance(o, SourceImage)]
        # A cut exactly between frames cannot be told from a shorter shard: TFRecord has no end marker.
        assert [(d["id"], d["error"]) for d in damage] == (
            [] if cut in (0, *ends) else [(f"cut#{whole}", TRUNCATED_SHARD)]
        )


# ---------------------------------------------------------------- parquet


def _chunk_start(column) -> int:
    return column.dictionary_page_offset if column.has_dictionary_page else column.data_page_offset


def test_parquet_ids_fallbacks_and_a_damaged_row_group(tmp_path, images):
    items = list(images.items())
    a = write_parquet(tmp_path / "a.parquet", [(k, d) for k, d in items[:3]] + [(None, items[3][1]), ("nul", None)])
    b = write_parquet(tmp_path / "b.parquet", [(k, d) for k, d in items[4:]], id_column="name")  # no `key` column
    # c: 6 rows in row groups of 3; the image chunk of row group 0 overwritten with junk
    c = write_parquet(tmp_path / "c.parquet", items, row_group_size=3)
    column = pq.ParquetFile(c).metadata.row_group(0).column(1)
    raw = bytearray(c.read_bytes())
    start = _chunk_start(column)
    raw[start : start + column.total_compressed_size] = b"\xff" * column.total_compressed_size
    c.write_bytes(bytes(raw))
    counters = run_read(
        f"{tmp_path}/*.parquet",
        images=[(k, f"{a}#row={i}", sha(d), None) for i, (k, d) in enumerate(items[:3])]
        + [("a.parquet#row=3", f"{a}#row=3", sha(items[3][1]), None)]
        + [(f"b.parquet#row={i}", f"{b}#row={i}", sha(d), None) for i, (_, d) in enumerate(items[4:])]
        + [(k, f"{c}#row={i + 3}", sha(d), None) for i, (k, d) in enumerate(items[3:])],
        errors=[("nul", f"{a}#row=4", reasons.EMPTY_FILE), ("c.parquet#row=0", f"{c}#row=0", TRUNCATED_SHARD)],
        messages={"c.parquet#row=0": "rows 0..2 (3) lost"},
    )
    assert counters["images_seen"] == 5 + 2 + 4


def test_parquet_columns_are_configurable_and_checked(tmp_path, images):
    items = list(images.items())[:2]
    path = write_parquet(tmp_path / "p.parquet", items, id_column="id", image_column="png")
    out = list(read_parquet(str(path), "p", image_column="png", id_column="id", max_bytes=MAX_BYTES))
    assert [(o.id, o.uri, sha(o.data)) for o in out] == [
        (k, f"{path}#row={i}", sha(d)) for i, (k, d) in enumerate(items)
    ]
    (missing,) = read_parquet(str(path), "p", max_bytes=MAX_BYTES)  # default column jpg is not there
    assert (missing["id"], missing["error"]) == ("p", reasons.UNREADABLE) and "'jpg'" in missing["message"]
    path.write_bytes(path.read_bytes()[:-100])  # no footer: nothing can be read, one row says so
    (cut,) = read_parquet(str(path), "p", image_column="png", max_bytes=MAX_BYTES)
    assert (cut["id"], cut["error"]) == ("p#row=0", TRUNCATED_SHARD)


# ---------------------------------------------------------------- URI lists


def test_uri_lists_text_csv_and_parquet(tmp_path, images):
    items = list(images.items())
    write_files(tmp_path / "files", images)
    f = {k: f"{tmp_path}/files/{k}.jpg" for k, _ in items}
    lists = tmp_path / "lists"
    write_files(lists / "here", {"local": images[items[0][0]]})
    text = write_text_list(
        lists / "a.txt", [f"../files/{items[0][0]}.jpg", f[items[1][0]], "../files/missing.jpg", "here/local.jpg"]
    )
    csv_list = write_csv_list(lists / "b.csv", [(f[items[2][0]], "two"), (f[items[3][0]], None)])
    bare = write_csv_list(lists / "c.csv", [(f"../files/{items[5][0]}.jpg", "five")], header=False)
    pq.write_table(pa.table({"url": [f[items[4][0]]], "id": ["four"]}), lists / "d.parquet")
    spec = InputSpec(paths=(str(text), str(csv_list), str(bare), f"{lists}/d.parquet"), format="urilist")
    files = f"{tmp_path}/files"
    counters = run_read(
        spec,
        images=[
            # No id column: the normalised URI (relative to the input root, lists/, if it were under it)
            (f"{files}/{items[0][0]}.jpg", f"{files}/{items[0][0]}.jpg", sha(items[0][1]), None),
            (f"{files}/{items[1][0]}.jpg", f[items[1][0]], sha(items[1][1]), None),
            ("two", f[items[2][0]], sha(items[2][1]), None),
            (f"{files}/{items[3][0]}.jpg", f[items[3][0]], sha(items[3][1]), None),
            ("four", f[items[4][0]], sha(items[4][1]), None),
            ("five", f"{files}/{items[5][0]}.jpg", sha(items[5][1]), None),
            ("here/local.jpg", f"{lists}/here/local.jpg", sha(items[0][1]), None),
        ],
        errors=[(f"{files}/missing.jpg", f"{files}/missing.jpg", reasons.UNREADABLE)],
    )
    assert counters["images_seen"] == 8
