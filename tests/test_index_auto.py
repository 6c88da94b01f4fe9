"""`--index auto`: the documented choice at several sizes and budgets, the sizing rules, and a real build."""

from __future__ import annotations

import math
import pathlib
import re

import pytest
from index_fixtures import write_embeddings

from pipeline.config import IndexConfig
from pipeline.index.auto import (
    MIN_TRAIN_POINTS_PER_LIST,
    choose_index,
    factory_for,
    nlist_for,
    parse_memory_budget,
    train_size_for,
)
from pipeline.index.build import build_index

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs" / "INDEX.md"

GB = 10**9


@pytest.mark.parametrize(
    ("n", "budget", "expected"),
    [
        (1, 4 * GB, ("flat", "Flat")),
        (10_000, 4 * GB, ("flat", "Flat")),
        (49_999, 4 * GB, ("flat", "Flat")),
        (50_000, 4 * GB, ("ivf-flat", "IVF894,Flat")),  # 4*sqrt(50,000) = 894 lists
        (400_000, 4 * GB, ("ivf-flat", "IVF2529,Flat")),  # 3.3 GB of raw vectors still fit
        (500_000, 4 * GB, ("ivf-sq8", "IVF2828,SQ8")),  # 4.1 GB would not: 1 byte per dimension
        (1_000_000, 4 * GB, ("ivf-sq8", "IVF3360,SQ8")),  # lists capped by the 131,072-vector sample / 39
        (1_000_000, 16 * GB, ("ivf-flat", "IVF3360,Flat")),
        (10_000_000, 4 * GB, ("ivf-pq", "OPQ256_1024,IVF3360,PQ256np")),
        (10_000_000, 1 * GB, ("ivf-pq", "OPQ64_256,IVF3360,PQ64np")),  # smaller codes to fit
        (30_000, 100 * 10**6, ("ivf-sq8", "IVF692,SQ8")),  # small corpus, flat does not fit
        (10_000, 10 * 10**6, ("ivf-pq", "OPQ128_512,IVF230,PQ128np")),
    ],
)
def test_auto_picks_the_documented_type(n, budget, expected):
    assert choose_index(n, 2048, budget) == expected


def test_the_table_in_docs_matches_the_code():
    rows = re.findall(r"^\|\s*([\d,]+)\s*\|\s*(\S+)\s*\|\s*(\S+)\s*\|\s*`([^`]+)`\s*\|", DOCS.read_text(), re.M)
    assert len(rows) >= 8, "docs/INDEX.md should hold the auto table"
    for n, budget, index_type, factory in rows:
        assert choose_index(int(n.replace(",", "")), 2048, parse_memory_budget(budget)) == (index_type, factory)


def test_a_budget_nothing_fits_is_a_clear_error():
    with pytest.raises(ValueError, match=r"no IVF-PQ index of 1,000,000,000 vectors .* raise --memory-budget"):
        choose_index(10**9, 2048, 10**6)
    with pytest.raises(ValueError, match=r"at least one vector"):
        choose_index(0, 2048, GB)


@pytest.mark.parametrize("n", [100, 2_000, 50_000, 250_000, 1_000_000, 50_000_000])
def test_nlist_scales_with_the_corpus_and_the_training_sample(n):
    nlist, train = nlist_for(n, 2048), train_size_for(n, 2048)
    assert 1 <= nlist <= 4 * math.sqrt(n)
    assert nlist <= train // MIN_TRAIN_POINTS_PER_LIST, "k-means needs >= 39 points per list"
    assert train < n, "the held-out queries are never training points"
    if 10_000 <= n <= 400_000:  # neither bound bites: ~4*sqrt(n)
        assert nlist == int(4 * math.sqrt(n))


def test_named_types_and_memory_budgets():
    assert factory_for("hnsw", 10, 2048, GB) == "HNSW32"
    assert factory_for("ivf-pq", 1_000_000, 2048, 100 * 10**6).startswith("OPQ64_256,")
    assert parse_memory_budget("4GB") == 4 * GB
    assert parse_memory_budget("4GiB") == parse_memory_budget("4G") == 4 << 30
    assert parse_memory_budget("1.5 MB") == 1_500_000
    assert parse_memory_budget(12345) == 12345
    for bad in ("lots", "0GB", "-1GB", "4 parsecs"):
        with pytest.raises(ValueError):
            parse_memory_budget(bad)
    with pytest.raises(ValueError, match=r"unknown index type"):
        factory_for("lsh", 10, 8, GB)


def test_auto_build_follows_choose_index(tmp_path):
    from test_index_build import MODEL, clustered

    root = write_embeddings(str(tmp_path / "emb"), clustered(3000, 64, seed=4), model=MODEL, files=2)
    small = build_index(root, str(tmp_path / "a"), IndexConfig(memory_budget=300_000))  # 768 kB: raw won't fit
    assert (small["index_type"], small["factory"]) == choose_index(3000, 64, 300_000) == ("ivf-sq8", "IVF69,SQ8")
    assert small["recall_at_10"] >= 0.95
    roomy = build_index(root, str(tmp_path / "b"))
    assert (roomy["index_type"], roomy["factory"]) == ("flat", "Flat")
