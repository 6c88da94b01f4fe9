"""Beam pipeline options: the runner (an offline-safe local default) and the local worker processes.

One home for them, used by the embedding job, nightly and the distributed index build.
"""

from __future__ import annotations

from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions

LOCAL_RUNNER = "FnApiRunner"
LOCAL_RUNNERS = (LOCAL_RUNNER, "DirectRunner", "BundleBasedDirectRunner", "SwitchingDirectRunner", "PrismRunner")


def pipeline_options(beam_args: list[str], *, workers: int = 1) -> PipelineOptions:
    """Beam options from pass-through args, with an offline-safe local default.

    Without --runner we use the FnApiRunner directly: DirectRunner would first try
    the Prism runner, which downloads a binary from the internet.
    """
    options = PipelineOptions(beam_args)
    std = options.view_as(StandardOptions)
    if not std.runner:
        std.runner = LOCAL_RUNNER
    direct = options.view_as(DirectOptions)
    if workers > 1 and std.runner in LOCAL_RUNNERS:
        direct.direct_num_workers = workers
        direct.direct_running_mode = "multi_processing"
    return options


def runs_locally(options: PipelineOptions) -> bool:
    """True when the workers are processes of this machine (a local runner)."""
    return options.view_as(StandardOptions).runner in LOCAL_RUNNERS
