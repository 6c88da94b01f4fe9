"""Helpers for DoFns that hold elements back and emit them at the end of a bundle."""

from __future__ import annotations

import apache_beam as beam
from apache_beam.transforms import window
from apache_beam.utils.windowed_value import WindowedValue


def in_global_window(item):
    """An output of `finish_bundle` (plain or TaggedOutput) placed in the global window.

    finish_bundle has no current element to take a window from; the pipelines that
    use it are batch pipelines in the global window.
    """
    if isinstance(item, beam.pvalue.TaggedOutput):
        return beam.pvalue.TaggedOutput(item.tag, WindowedValue(item.value, 0, [window.GlobalWindow()]))
    return WindowedValue(item, 0, [window.GlobalWindow()])
