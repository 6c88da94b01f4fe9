"""Where decoding runs: fused with inference on one worker, or in a stage of its own.

`fused` (the default): decode and embed run in one fused stage, decoding on a thread pool a few
images ahead of the model (pipeline/decode.py). On a CPU worker that is the fastest layout; on a
GPU worker it needs either GPU decoding (`--decode gpu`) or enough CPU cores to feed the card.

`separate`: decoding runs in its own stage and the decoded pixels cross a shuffle
(pipeline/transport.py) to the inference stage, the only one that asks for an accelerator. On
Dataflow, right fitting then runs decoding on cheap CPU workers and inference on GPU workers,
each pool sized for its own work. Dataflow's rules for that (docs.cloud.google.com/dataflow/docs/
guides/right-fitting): the GPU is requested with an `accelerator` resource hint on the steps
that need it, and the pipeline-wide `worker_accelerator` service option must not be used. So in
this layout the job's `worker_accelerator` option (and a GPU `--machine_type`) become the hint of
the inference stage, and the rest of the pipeline runs on `--decode-machine-type` (or Dataflow's
default machine type).
"""

from __future__ import annotations

import logging

import apache_beam as beam
from apache_beam.options.pipeline_options import GoogleCloudOptions, PipelineOptions, WorkerOptions

from pipeline import transport

log = logging.getLogger(__name__)

# Machine families that carry GPUs on Dataflow (A2/A3: A100/H100/H200, G2: L4, G4: RTX PRO 6000).
GPU_MACHINE_FAMILIES = ("a2-", "a3-", "a4-", "g2-", "g4-")
_SERVICE_OPTION = "worker_accelerator="


def accelerator_hint(options: PipelineOptions, *, decode_machine_type: str | None = None) -> str | None:
    """Move the job's GPU request into an `accelerator` hint for the inference stage (separate layout).

    Removes `worker_accelerator=...` from `--dataflow_service_options` and returns its value (with
    `machine_type:` added when `--machine_type` names a GPU machine, which then leaves the
    pipeline-wide options); `decode_machine_type` becomes the pipeline's machine type. Returns
    None when the job asks for no accelerator.
    """
    cloud = options.view_as(GoogleCloudOptions)
    worker = options.view_as(WorkerOptions)
    services = list(cloud.dataflow_service_options or [])
    found = [s for s in services if s.startswith(_SERVICE_OPTION)]
    hint = found[-1][len(_SERVICE_OPTION) :] if found else None
    if found:
        cloud.dataflow_service_options = [s for s in services if not s.startswith(_SERVICE_OPTION)] or None
    machine = worker.machine_type
    if machine and machine.startswith(GPU_MACHINE_FAMILIES):
        if hint is None:
            raise ValueError(
                f"--machine_type {machine} is a GPU machine but no worker_accelerator service option says which "
                "GPU: add --dataflow_service_options 'worker_accelerator=type:...;count:1;install-nvidia-driver'"
            )
        if "machine_type:" not in hint:
            hint = f"{hint};machine_type:{machine}"
        worker.machine_type = None
    if decode_machine_type:
        worker.machine_type = decode_machine_type
    if hint:
        log.info("embedpipe: inference stage asks for accelerator %s; decoding runs on %s", hint, worker.machine_type)
    return hint


class InferenceStage(beam.PTransform):
    """Decoded images that crossed the shuffle as bytes -> EmbedImages' outputs, in one stage.

    The pixels are decoded from their transport form inside the stage that embeds them, so the
    accelerator hint covers both steps and nothing else separates them.
    """

    def __init__(self, embed: beam.PTransform) -> None:
        super().__init__()
        self._embed = embed

    def expand(self, blobs):
        return blobs | "DecodePixels" >> beam.Map(transport.decode) | "Embed" >> self._embed


def hints_of(node) -> dict[str, str]:
    """Resource hints of a transform node in the graph, readable (for --dry-run)."""
    hints = getattr(node, "resource_hints", None) or {}
    return {urn.split(":")[2]: value.decode() for urn, value in hints.items()}
