"""Helpers to run the real embedding job in tests and read what it wrote."""

from __future__ import annotations

import glob
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import EmbedConfig, ModelConfig
from pipeline.job import run_embed


def embed(input_dir, output_dir, *, workers: int = 1, batch_size: int = 4, **model_kw) -> dict:
    """Run the job on the local FnApiRunner; returns the manifest."""
    model_kw.setdefault("weights", "random")
    cfg = EmbedConfig(
        input=str(input_dir), output=str(output_dir), model=ModelConfig(**model_kw), batch_size=batch_size
    )
    return run_embed(cfg, workers=workers)


def read_dir(directory) -> pa.Table:
    files = sorted(glob.glob(os.path.join(str(directory), "*.parquet")))
    assert files, f"no parquet files in {directory}"
    return pa.concat_tables([pq.read_table(f) for f in files])


def embeddings_by_id(output_dir) -> dict[str, np.ndarray]:
    table = read_dir(os.path.join(str(output_dir), "embeddings"))
    vectors = table.column("embedding").combine_chunks().values.to_numpy().reshape(table.num_rows, -1)
    return dict(zip(table.column("id").to_pylist(), vectors, strict=True))


def errors_by_id(output_dir) -> dict[str, dict]:
    table = read_dir(os.path.join(str(output_dir), "errors"))
    return {row["id"]: row for row in table.to_pylist()}


def manifest(output_dir) -> dict:
    with open(os.path.join(str(output_dir), "manifest.json")) as f:
        return json.load(f)
