"""Dataflow GPU options resolve as documented, checked with --dry-run (no cloud is contacted)."""

from __future__ import annotations

import json

import pytest

from pipeline.cli import main
from pipeline.model import configure_tensorflow

DATAFLOW = [
    "--runner", "DataflowRunner",
    "--project", "my-project",
    "--region", "us-central1",
    "--temp_location", "gs://my-bucket/tmp",
    "--sdk_container_image", "us-central1-docker.pkg.dev/my-project/embedpipe/embedpipe:2026-11-28",
    "--machine_type", "g2-standard-8",
    "--dataflow_service_options", "worker_accelerator=type:nvidia-l4;count:1;install-nvidia-driver",
    "--experiments", "no_use_multiple_sdk_containers",
]  # fmt: skip


def plan(capsys, argv: list[str]) -> tuple[dict, list[str]]:
    assert main(argv) == 0
    text = capsys.readouterr().out
    head, _, graph = text.partition("transforms:")
    return json.loads(head), [line.strip() for line in graph.splitlines() if line.strip()]


def test_dry_run_resolves_the_gpu_job_without_submitting(capsys, tmp_path):
    argv = ["embed", "--input", "gs://my-bucket/images/", "--output", "gs://my-bucket/out", "--require-gpu"]
    resolved, graph = plan(capsys, [*argv, "--dry-run", *DATAFLOW])
    options = resolved["pipeline_options"]
    assert options["runner"] == "DataflowRunner"
    assert options["sdk_container_image"].endswith("/embedpipe:2026-11-28")
    assert options["machine_type"] == "g2-standard-8"
    assert options["dataflow_service_options"] == ["worker_accelerator=type:nvidia-l4;count:1;install-nvidia-driver"]
    assert "no_use_multiple_sdk_containers" in options["experiments"]  # one SDK process per GPU VM
    assert resolved["batch_size"] == 128  # GPU default when accelerators are requested
    for stage in ("ReadImages", "DecodeImages", "EmbedImages", "WriteEmbeddings", "WriteErrors"):
        assert stage in graph
    assert not (tmp_path / "out").exists()


def test_local_dry_run_uses_the_offline_runner_and_cpu_batch(capsys, tmp_path):
    resolved, _ = plan(capsys, ["embed", "--input", str(tmp_path), "--output", str(tmp_path / "o"), "--dry-run"])
    assert resolved["pipeline_options"]["runner"] == "FnApiRunner"
    assert resolved["batch_size"] == 32


def test_nightly_dry_run_plans_the_run_directory(capsys, tmp_path):
    resolved, graph = plan(
        capsys, ["nightly", "--input", "gs://b/images", "--root", "gs://b/root", "--dry-run", *DATAFLOW]
    )
    assert resolved["embed_config"]["output"] == "gs://b/root/runs/<run-id>"
    assert "EmbedImages" in graph


def test_require_gpu_fails_at_startup_without_a_gpu():
    with pytest.raises(RuntimeError, match="--require-gpu was given but TensorFlow sees no GPU"):
        configure_tensorflow(require_gpu=True)
