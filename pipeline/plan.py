"""What `--dry-run` prints: the resolved options, the model and the transform graph, with nothing run."""

from __future__ import annotations

import dataclasses

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from pipeline.config import EmbedConfig
from pipeline.embed_pipeline import build_embed_pipeline, embed_options, resolve_batch_size, utc_now
from pipeline.runner import LOCAL_RUNNER
from pipeline.topology import hints_of


def describe_pipeline(p: beam.Pipeline) -> list[str]:
    """The transform graph as indented labels (what Dataflow would show), without running it."""
    from apache_beam.pipeline import PipelineVisitor

    lines: list[str] = []

    class _Visitor(PipelineVisitor):
        def enter_composite_transform(self, node):
            if node.full_label:
                lines.append("  " * node.full_label.count("/") + node.full_label.rsplit("/", 1)[-1])

        def visit_transform(self, node):
            lines.append("  " * node.full_label.count("/") + node.full_label.rsplit("/", 1)[-1])

        def leave_composite_transform(self, node):
            # Hints are shown once, on the composite that carries them (its steps inherit them).
            hints = hints_of(node)
            own = hints and hints != hints_of(node.parent) if node.parent is not None else hints
            if own and lines:
                label = "  " * node.full_label.count("/") + node.full_label.rsplit("/", 1)[-1]
                at = max(i for i, line in enumerate(lines) if line == label)
                lines[at] += "  [" + ", ".join(f"{k}={v}" for k, v in sorted(hints.items())) + "]"

    p.visit(_Visitor())
    return lines


def plan_embed(
    cfg: EmbedConfig, beam_args: list[str] | None = None, *, workers: int = 1, require_gpu: bool = False
) -> dict:
    """Resolve options and build (not run) the pipeline: what `--dry-run` prints."""
    cfg = cfg.resolve()  # the fingerprint names a weights file by its sha256
    options, accelerator = embed_options(cfg, list(beam_args or []), workers=workers)
    # The graph is built under the local runner: constructing a pipeline for
    # Dataflow would validate against (and call) Google Cloud.
    graph_options = PipelineOptions.from_dictionary(options.get_all_options(drop_default=True))
    graph_options.view_as(StandardOptions).runner = LOCAL_RUNNER
    p = build_embed_pipeline(
        cfg,
        graph_options,
        embeddings_dir=f"{cfg.output.rstrip('/')}/embeddings",
        errors_dir=f"{cfg.output.rstrip('/')}/errors",
        embedded_at=utc_now(),
        require_gpu=require_gpu,
        accelerator=accelerator,
    )
    return {
        "batch_size": resolve_batch_size(cfg, options, require_gpu=require_gpu or bool(accelerator)),
        "accelerator_hint": accelerator,
        "pipeline_options": options.get_all_options(drop_default=True),
        "model": cfg.model.fingerprint(),
        "embed_config": {
            **dataclasses.asdict(cfg),
            "input": cfg.input.to_dict(),
        },
        "transforms": describe_pipeline(p),
    }
