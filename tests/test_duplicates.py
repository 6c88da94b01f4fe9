"""`embedpipe duplicates`: planted copies of real photos through the real embed and index commands,
the grouping itself against brute force, the --auto threshold, the Parquet, the page (and in Chromium)."""

from __future__ import annotations

import io
import json
import tracemalloc

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from index_fixtures import swatch_jpeg, write_index_dir
from PIL import Image
from test_report import CHROMIUM, Page, check_self_contained, render_in_chromium

from pipeline.cli import main
from pipeline.index.duplicates import components, find_duplicates
from pipeline.index.duplicates_page import read_groups, render_duplicates_page, write_groups
from pipeline.index.threshold import choose_threshold
from pipeline.sample import jpeg_bytes, photos

PLANTED = ("astronaut", "chelsea", "coffee", "rocket")
VARIANTS = ("copy", "q60", "half")


@pytest.fixture(scope="module")
def photo_index(tmp_path_factory):
    """12 photos; 4 of them also as a byte copy, a JPEG quality 60 re-encode and a 0.5x resize;
    embedded (seeded random weights, 32 px, thumbnails) and indexed by the real commands."""
    base = tmp_path_factory.mktemp("duplicates")
    corpus = base / "corpus"
    corpus.mkdir()
    for name, img in sorted(photos().items()):
        small = img.copy()
        small.thumbnail((160, 160))
        data = jpeg_bytes(small, quality=90)
        (corpus / f"{name}.jpg").write_bytes(data)
        if name in PLANTED:
            decoded = Image.open(io.BytesIO(data)).convert("RGB")
            (corpus / f"{name}-copy.jpg").write_bytes(data)
            (corpus / f"{name}-q60.jpg").write_bytes(jpeg_bytes(decoded, quality=60))
            half = decoded.resize((decoded.width // 2, decoded.height // 2), Image.Resampling.BILINEAR)
            (corpus / f"{name}-half.jpg").write_bytes(jpeg_bytes(half, quality=90))
    model = ["--weights", "random", "--image-size", "32", "--batch-size", "8"]
    assert main(["embed", "--input", str(corpus), "--output", str(base / "out"), "--thumbnails", *model]) == 0
    assert main(["index", "--embeddings", str(base / "out"), "--output", str(base / "index")]) == 0
    return base / "index", sorted(p.stem for p in corpus.iterdir())


def groups_of(path) -> list[set[str]]:
    table = pq.read_table(path)
    out: dict[int, set[str]] = {}
    for gid, id_ in zip(table.column("group_id").to_pylist(), table.column("id").to_pylist()):
        out.setdefault(gid, set()).add(id_.removesuffix(".jpg"))
    return [out[g] for g in sorted(out)]


@pytest.mark.slow
def test_auto_groups_every_planted_copy_with_its_original_and_nothing_else(photo_index, tmp_path, capsys):
    index, names = photo_index
    out, page = tmp_path / "groups.parquet", tmp_path / "groups.html"
    assert main(["duplicates", "--index", str(index), "--auto", "--output", str(out), "--html", str(page)]) == 0
    printed = capsys.readouterr()
    groups = groups_of(out)
    assert sorted(groups, key=min) == [{p, *(f"{p}-{v}" for v in VARIANTS)} for p in PLANTED]
    originals = [n for n in names if "-" not in n]
    assert all(len(g & set(originals)) == 1 for g in groups)  # no group mixes two unrelated photos
    # --auto says what it chose and why, including how close unrelated photos are with these weights.
    line = printed.out.splitlines()[0]
    assert line.startswith("embedpipe duplicates: --auto: cos >= 0.99") and "the middle of the gap" in line
    assert "16 images whose closest neighbour is within" in line and "typical closest neighbour: cos 0.9" in line
    assert "groups    4 holding 16 images" in printed.out and not printed.err
    # The same groups at an explicit threshold inside the gap; a threshold below it merges unrelated photos.
    assert main(["duplicates", "--index", str(index), "--threshold", "0.995", "--output", str(out)]) == 0
    assert sorted(groups_of(out), key=min) == sorted(groups, key=min)
    assert main(["duplicates", "--index", str(index), "--threshold", "0.9", "--output", str(out)]) == 0
    assert max(len(g & set(originals)) for g in groups_of(out)) > 1


@pytest.mark.slow
def test_the_page_shows_groups_largest_first_with_thumbnails(photo_index, tmp_path):
    index, _ = photo_index
    out = tmp_path / "groups.parquet"
    assert main(["duplicates", "--index", str(index), "--output", str(out)]) == 0  # --auto is the default
    page = Page(render_duplicates_page(str(out)))  # the index (for thumbnails) comes from the file
    images = check_self_contained(page)
    groups = page.find("section", **{"class": "group"})
    assert [int(g["attrs"]["data-size"]) for g in groups] == [4, 4, 4, 4]
    members = [page.inside(g, "figure") for g in groups]
    assert all(page.inside(m[0], "b")[0]["text"] == "representative" for m in members)
    assert sum(1 for i in images if i[:3] == b"\xff\xd8\xff") == 16  # every member's stored JPEG thumbnail
    assert "threshold" in {e["attrs"].get("data-plot") for e in page.find("img")}


def clustered_with_planted(n: int, dim: int, groups: list[int], seed: int = 0) -> tuple[np.ndarray, list[list[int]]]:
    """Clustered vectors with planted near-duplicate groups of the given sizes (1 - cos ~ 1e-4 to their source)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((50, dim))
    x = centres[rng.integers(0, 50, n)] + 0.6 * rng.standard_normal((n, dim))
    planted, extra = [], []
    sources = rng.choice(n, size=len(groups), replace=False)
    for source, size in zip(sources, groups):
        members = [int(source)]
        for _ in range(size - 1):
            noise = rng.standard_normal(dim) * 0.01 * np.linalg.norm(x[source]) / np.sqrt(dim)
            extra.append(x[source] + noise)
            members.append(n + len(extra) - 1)
        planted.append(members)
    return np.vstack([x, np.array(extra)]).astype(np.float32), planted


def brute_force_groups(x: np.ndarray, threshold: float) -> set[frozenset[int]]:
    """Connected components of every pair at cosine >= threshold, the slow obvious way."""
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    parent = list(range(len(x)))

    def find(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for a, b in zip(*np.nonzero(np.triu(unit @ unit.T >= np.float32(threshold), k=1))):
        parent[find(int(a))] = find(int(b))
    comps: dict[int, set[int]] = {}
    for i in range(len(x)):
        comps.setdefault(find(i), set()).add(i)
    return {frozenset(c) for c in comps.values() if len(c) > 1}


def label_groups(result) -> set[frozenset[int]]:
    out: dict[int, set[int]] = {}
    for gid, id_ in zip(result.table.column("group_id").to_pylist(), result.table.column("id").to_pylist()):
        out.setdefault(gid, set()).add(int(id_.split("-")[1]))
    return {frozenset(g) for g in out.values()}


@pytest.mark.parametrize(
    ("factory", "exact_max"),
    [("Flat", 20_000), ("Flat", 500), ("IVF32,Flat", 0), ("IVF32,SQ8", 0), ("HNSW16", 500)],
    ids=["flat-exact", "flat-kmeans-cells", "ivf-flat-lists", "ivf-sq8-lists", "hnsw-kmeans-cells"],
)
def test_cells_find_the_groups_brute_force_finds(tmp_path, factory, exact_max):
    x, planted = clustered_with_planted(3000, 48, [2, 2, 3, 3, 4, 5, 6, 9, 20] * 3)
    index = write_index_dir(tmp_path / "index", x, factory=factory)
    result = find_duplicates(index, threshold=0.995, exact_max=exact_max)
    want = brute_force_groups(x, 0.995)
    assert want == {frozenset(p) for p in planted}  # the data: exactly the planted groups
    assert label_groups(result) == want
    sizes = [len(g) for g in label_groups(result)]
    assert result.info["largest_groups"] == sorted(sizes, reverse=True)[:10]
    group_ids = result.table.column("group_id").to_numpy()
    assert np.all(np.diff(group_ids) >= 0)
    # Groups of 20 join through their members: each keeps only its 16 closest others.
    assert result.info["saturated"] >= 3 * 20


def test_a_huge_cell_is_searched_in_chunks_with_the_same_groups(tmp_path, monkeypatch):
    from pipeline.index import duplicates

    # 3,000 vectors in one cell, read 700 at a time by queries of 300: as a cell of millions would be.
    monkeypatch.setattr(duplicates, "CAND_CHUNK", 700)
    monkeypatch.setattr(duplicates, "QUERY_ROWS", 300)
    x, planted = clustered_with_planted(3000, 48, [2, 3, 5, 20])
    result = find_duplicates(write_index_dir(tmp_path / "index", x), threshold=0.995)
    assert label_groups(result) == {frozenset(p) for p in planted}


def test_union_find_joins_chains_and_cycles():
    a = np.array([0, 1, 2, 5, 6, 7, 9, 9])
    b = np.array([1, 2, 3, 6, 7, 5, 9, 8])
    roots = components(10, a, b)
    assert roots.tolist() == [0, 0, 0, 0, 4, 5, 5, 5, 8, 8]
    assert components(3, np.zeros(0, int), np.zeros(0, int)).tolist() == [0, 1, 2]
    # A long chain whose edges come in the worst order still ends in one component.
    n = 5000
    order = np.random.default_rng(0).permutation(n - 1)
    assert set(components(n, order, order + 1).tolist()) == {0}


def test_auto_is_honest_when_there_is_no_gap():
    rng = np.random.default_rng(0)
    # Nearest-neighbour distances spread evenly over three decades: nothing separates copies from neighbours.
    smooth = 1.0 - 10 ** rng.uniform(-4, -1, 5000)
    choice = choose_threshold(smooth.astype(np.float32))
    assert not choice.clear and choice.reason.startswith("no gap between near-duplicates and ordinary neighbours")
    assert "pass --threshold" in choice.reason
    # 1% of the images have a copy 1e-4 away; everything else is 1e-2 or farther: a clear gap.
    gapped = np.concatenate([1.0 - 10 ** rng.uniform(-4.3, -3.7, 50), 1.0 - 10 ** rng.uniform(-2, -0.7, 4950)])
    choice = choose_threshold(gapped.astype(np.float32))
    assert choice.clear and 1 - 10**-2 < choice.threshold < 1 - 10**-3.7
    assert "50 images whose closest neighbour is within" in choice.reason


def test_memory_stays_bounded_no_n_by_n_matrix(tmp_path):
    rng = np.random.default_rng(1)
    n = 12_000  # compared exactly, every pair: an n x n float32 matrix would be 576 MB
    index = write_index_dir(tmp_path / "index", rng.standard_normal((n, 16)).astype(np.float32))
    tracemalloc.start()
    try:
        find_duplicates(index, threshold=0.999)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, f"peak {peak / 2**20:.0f} MiB"


def test_parquet_holds_the_groups_and_how_they_were_found(tmp_path):
    x, _ = clustered_with_planted(500, 32, [3, 2])
    index = write_index_dir(tmp_path / "index", x, thumbnails=[swatch_jpeg(i) for i in range(len(x))])
    result = find_duplicates(index, threshold=0.995)
    path = tmp_path / "g.parquet"
    write_groups(result, str(path))
    table, info = read_groups(str(path))
    assert table.schema.names == ["group_id", "id", "uri", "score_to_representative", "representative"]
    assert table.schema.field("score_to_representative").type == pa.float32()
    assert table.column("group_id").to_pylist() == [0, 0, 0, 1, 1]  # largest group first
    for gid in (0, 1):
        rows = [r for r in table.to_pylist() if r["group_id"] == gid]
        assert rows[0]["id"] == rows[0]["representative"] and rows[0]["score_to_representative"] == 1.0
        assert all(0.995 <= r["score_to_representative"] <= 1.0 for r in rows)
        assert [r["score_to_representative"] for r in rows[1:]] == sorted(
            (r["score_to_representative"] for r in rows[1:]), reverse=True
        )
    assert info["threshold"] == 0.995 and info["auto"] is False and info["groups"] == 2 and info["ntotal"] == 503
    assert sum(info["nn_log10_histogram"]["counts"]) == 503
    json.dumps(info)  # plain JSON, for the page and the server


def test_command_errors_are_one_line(tmp_path, capsys):
    assert main(["duplicates", "--index", str(tmp_path / "nowhere"), "--output", str(tmp_path / "g.parquet")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("embedpipe duplicates: error: no index directory at")
    index = write_index_dir(tmp_path / "index", np.eye(8, dtype=np.float32))
    assert main(["duplicates", "--index", index, "--threshold", "1.5", "--output", str(tmp_path / "g.parquet")]) == 2
    assert "--threshold is a cosine similarity in (-1, 1]" in capsys.readouterr().err
    assert not (tmp_path / "g.parquet").exists()


@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (Debian: apt-get install chromium)")
def test_duplicates_page_renders_in_chromium(photo_index, tmp_path):
    index, _ = photo_index
    out, page = tmp_path / "groups.parquet", tmp_path / "groups.html"
    assert main(["duplicates", "--index", str(index), "--output", str(out), "--html", str(page)]) == 0
    shot = tmp_path / "duplicates.png"
    seen = render_in_chromium(page, shot)
    assert not seen["errors"], seen["errors"]
    assert len(seen["images"]) == 17 and all(w > 0 and h > 0 for w, h in seen["images"])  # 16 thumbnails + plot
    assert all(u.startswith(("file:", "data:")) for u in seen["requested"]), seen["requested"]
    with Image.open(shot) as img:
        assert img.width == 1280 and img.height > 900
