"""Tuning nprobe / efSearch: the chosen value holds the recall target on queries it was not tuned on."""

from __future__ import annotations

import faiss
import numpy as np
from index_fixtures import write_embeddings
from test_index_build import MODEL, clustered

from pipeline.config import IndexConfig
from pipeline.index.build import build_index
from pipeline.index.io import scan_dataset
from pipeline.index.quality import K, QuerySet, recall_lower_bound, recall_per_query, tune
from pipeline.index.train import prepare


def _ivf(x: np.ndarray, nlist: int) -> faiss.Index:
    index = faiss.index_factory(x.shape[1], f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = 0
    index.train(x)
    index.add(x)
    return index


def _query_set(index: faiss.Index, x: np.ndarray, rows: np.ndarray) -> QuerySet:
    _, truth = faiss.knn(x[rows], x, K + 1, metric=faiss.METRIC_INNER_PRODUCT)
    return QuerySet(np.ascontiguousarray(x[rows]), truth, rows)


def _recall(index: faiss.Index, qs: QuerySet) -> float:
    _, found = index.search(qs.queries, K + 1)
    hits, wanted = recall_per_query(found, qs.truth, qs.labels).sum(axis=0)
    return hits / wanted


def test_a_value_that_only_passes_on_the_tuning_queries_is_raised_until_held_out_queries_pass():
    x = clustered(6000, 32, seed=3, clusters=30)
    faiss.normalize_L2(x)
    index = _ivf(x, 64)
    rows = np.random.default_rng(0).permutation(len(x))
    # Sort candidate queries by how well nprobe=1 serves them: the "easy" ones reach the target at
    # nprobe=1, as queries the quantizer was trained on did; the rest stand for new queries.
    probe = _query_set(index, x, rows[:3000])
    faiss.extract_index_ivf(index).nprobe = 1
    per_query = recall_per_query(index.search(probe.queries, K + 1)[1], probe.truth, probe.labels)
    easy = probe.labels[per_query[:, 0] == per_query[:, 1]][:300]
    held_out = _query_set(index, x, rows[3000:3400])
    new = _query_set(index, x, rows[3400:3800])
    tuning = _query_set(index, x, easy)
    assert _recall(index, tuning) >= 0.99 and _recall(index, held_out) < 0.9  # nprobe=1 passes tuning only

    result = tune(index, tuning, held_out, 0.95)

    nprobe = result.params["nprobe"]
    assert nprobe > 1 and result.target_met and result.warning is None
    assert faiss.extract_index_ivf(index).nprobe == nprobe
    assert result.held_out.recall_low >= 0.95
    assert _recall(index, new) >= 0.95  # queries used in neither step
    faiss.extract_index_ivf(index).nprobe = nprobe - 1
    assert (
        recall_lower_bound(recall_per_query(index.search(held_out.queries, K + 1)[1], held_out.truth, held_out.labels))
        < 0.95
    ), "the smallest value that holds on the held-out queries"
    assert result.curve[0]["nprobe"] == 1 and result.curve[0]["recall_tuning"] >= 0.99


def test_an_unreachable_target_is_reported_not_hidden():
    x = clustered(3000, 32, seed=4)
    faiss.normalize_L2(x)
    index = faiss.index_factory(32, "IVF16,PQ4x4", faiss.METRIC_INNER_PRODUCT)  # codes far too coarse
    index.train(x)
    index.add(x)
    rows = np.random.default_rng(1).permutation(len(x))
    result = tune(index, _query_set(index, x, rows[:200]), _query_set(index, x, rows[200:400]), 0.99)
    assert not result.target_met
    assert "not reached" in result.warning and "0.99" in result.warning


def test_tuning_queries_are_held_out_of_training_too(tmp_path):
    root = str(tmp_path)
    write_embeddings(root, clustered(3000, 64, seed=1), model=MODEL, files=3)
    ds = scan_dataset(root)
    # IVF4 needs 200 training vectors; 300 eval + 300 tuning queries leave room for disjoint sets.
    a = prepare(ds, IndexConfig(index_type="IVF4,Flat", seed=5), batch_rows=256)
    assert len(a.train_labels) == 200 and len(a.tune_labels) == 300
    assert not set(a.tune_labels) & set(a.train_labels), "recall on training vectors is optimistic"
    assert not set(a.eval_labels) & (set(a.train_labels) | set(a.tune_labels))


def test_index_json_records_the_target_its_curve_and_the_held_out_bound(tmp_path):
    root = str(tmp_path / "emb")
    write_embeddings(root, clustered(3000, 64, seed=1), model=MODEL, files=2)
    meta = build_index(root, str(tmp_path / "index"), IndexConfig(index_type="ivf-flat", recall_target=0.95))
    assert meta["recall_target"] == 0.95 and meta["recall_target_met"] is True and meta["recall_warning"] is None
    assert 0.95 <= meta["recall_at_10_low"] <= meta["recall_at_10"]
    values = [point["nprobe"] for point in meta["tuning_curve"]]
    assert values == sorted(values) and meta["search_params"]["nprobe"] in values
