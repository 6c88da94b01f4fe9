"""--decode-stage separate: decoding in a stage of its own, pixels shuffled to an inference stage that
alone asks for the GPU; vectors equal the fused pipeline's exactly (real FnApiRunner runs)."""

from __future__ import annotations

import numpy as np
import pytest
from apache_beam.options.pipeline_options import GoogleCloudOptions, PipelineOptions, WorkerOptions
from apache_beam.pipeline import PipelineVisitor
from embed_helpers import embeddings_by_id, errors_by_id, manifest
from odd_images import encode, photo

from pipeline import transport
from pipeline.config import EmbedConfig, ModelConfig
from pipeline.embed_pipeline import build_embed_pipeline, embed_options, utc_now
from pipeline.imaging import decode_image
from pipeline.job import run_embed
from pipeline.records import DecodedImage
from pipeline.topology import accelerator_hint, hints_of

L4 = "type:nvidia-l4;count:1;install-nvidia-driver"
DATAFLOW_GPU = ["--dataflow_service_options", f"worker_accelerator={L4}", "--machine_type", "g2-standard-8"]


def _config(corpus, out, stage: str) -> EmbedConfig:
    model = ModelConfig(image_size=32, weights="random")
    return EmbedConfig(input=str(corpus), output=str(out), model=model, batch_size=4, decode_stage=stage)


def test_separate_gives_the_fused_vectors_exactly_and_every_row(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, name in enumerate(("astronaut", "coffee", "chelsea", "rocket", "camera")):
        (corpus / f"{name}.jpg").write_bytes(encode(photo((60 + 7 * i, 48), name), "JPEG", quality=90))
    (corpus / "cut.png").write_bytes(encode(photo((40, 40)), "PNG")[:100])

    fused = run_embed(_config(corpus, tmp_path / "fused", "fused"))
    separate = run_embed(_config(corpus, tmp_path / "separate", "separate"))

    assert fused["counts"] == separate["counts"] == {"seen": 6, "embedded": 5, "reused": 0, "failed": 1}
    a, b = embeddings_by_id(tmp_path / "fused"), embeddings_by_id(tmp_path / "separate")
    assert sorted(a) == sorted(b) and len(a) == 5
    for rid in a:
        assert np.array_equal(a[rid], b[rid]), rid  # lossless transport: the same pixels, the same vector
    assert errors_by_id(tmp_path / "separate")["cut.png"]["error"] == "truncated_image"
    assert manifest(tmp_path / "separate")["decode_stage"] == "separate"


def _hinted_leaves(cfg: EmbedConfig, beam_args: list[str]) -> dict[str, dict]:
    options, accelerator = embed_options(cfg, beam_args, workers=1)
    p = build_embed_pipeline(
        cfg, options, embeddings_dir="/x/e", errors_dir="/x/r", embedded_at=utc_now(), accelerator=accelerator
    )
    leaves: dict[str, dict] = {}

    class Visitor(PipelineVisitor):
        def visit_transform(self, node):
            leaves[node.full_label] = hints_of(node)

    p.visit(Visitor())
    return leaves, options


def test_the_accelerator_hint_sits_on_the_inference_stage_only(tmp_path):
    leaves, options = _hinted_leaves(_config(tmp_path, tmp_path / "out", "separate"), DATAFLOW_GPU)
    hinted = {label for label, hints in leaves.items() if "accelerator" in hints}
    assert hinted and all(label.startswith("EmbedImages/") for label in hinted)
    assert {label for label in leaves if label.startswith("EmbedImages/")} == hinted
    assert leaves["EmbedImages/DecodePixels"]["accelerator"] == f"{L4};machine_type:g2-standard-8"
    assert any(label.startswith("DecodeImages/") for label in leaves)  # decoding has no hint: CPU workers
    # Dataflow's rule for right fitting: no pipeline-wide worker_accelerator beside the hints.
    assert not options.view_as(GoogleCloudOptions).dataflow_service_options
    assert options.view_as(WorkerOptions).machine_type is None

    fused, options = _hinted_leaves(_config(tmp_path, tmp_path / "out", "fused"), DATAFLOW_GPU)
    assert not any(hints for hints in fused.values())  # fused: the job-wide GPU option stays as it was
    assert options.view_as(GoogleCloudOptions).dataflow_service_options == [f"worker_accelerator={L4}"]


def test_accelerator_hint_takes_the_gpu_machine_and_leaves_the_decode_machine():
    options = PipelineOptions([*DATAFLOW_GPU, "--dataflow_service_options", "enable_prime"])
    hint = accelerator_hint(options, decode_machine_type="n2-highcpu-16")
    assert hint == f"{L4};machine_type:g2-standard-8"
    assert options.view_as(GoogleCloudOptions).dataflow_service_options == ["enable_prime"]
    assert options.view_as(WorkerOptions).machine_type == "n2-highcpu-16"
    assert accelerator_hint(PipelineOptions([])) is None  # a CPU-only job: separate stages, no hint
    with pytest.raises(ValueError, match="no worker_accelerator"):
        accelerator_hint(PipelineOptions(["--machine_type", "a3-highgpu-1g"]))


def test_transport_is_lossless_and_smaller_than_raw_pixels():
    data = encode(photo((640, 480), "chelsea"), "JPEG", quality=92)
    pixels, width, height, _ = decode_image(data, size=224, max_pixels=10**8)
    image = DecodedImage("a/b.jpg", "gs://x/a/b.jpg", pixels, "f" * 64, width, height, '{"k": 1}', b"thumb", "m")
    blob = transport.encode(image)
    back = transport.decode(blob)
    assert np.array_equal(back.pixels, pixels) and back.pixels.dtype == np.uint8
    assert (back.id, back.uri, back.width, back.height, back.meta, back.thumbnail, back.marker) == (
        "a/b.jpg", "gs://x/a/b.jpg", 640, 480, '{"k": 1}', b"thumb", "m"
    )  # fmt: skip
    assert len(blob) < 0.8 * pixels.nbytes
