"""`embedpipe duplicates --auto`: the cosine threshold, chosen from how close each image's closest other is.

Near-duplicates (copies, re-encodes, resizes) sit orders of magnitude closer to their closest
other than ordinary images do; on a log scale of 1 - cos the two populations are two peaks with a
valley between them. The threshold is the middle of the emptiest valley; without one, it stays
far below the ordinary neighbours and says so (docs/DUPLICATES.md).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

LOG_FLOOR = -7.0  # 1 - cos below 1e-7 is float32 rounding: identical vectors


@dataclasses.dataclass(frozen=True)
class AutoChoice:
    """What `--auto` chose and why."""

    threshold: float  # cosine similarity
    clear: bool  # a gap separates near-duplicates from ordinary nearest neighbours
    reason: str  # one line


def nn_distances(scores: np.ndarray) -> np.ndarray:
    """log10(1 - cos) of each vector's closest other (floored at 1e-7), for vectors that have one."""
    s = scores[np.isfinite(scores)]
    return np.log10(np.clip(1.0 - s.astype(np.float64), 10**LOG_FLOOR, 2.0))


def choose_threshold(nearest: np.ndarray) -> AutoChoice:
    """The cosine threshold in the emptiest valley of log10(1 - cos) to each vector's closest other
    (`nearest`: best scores) between near-duplicates and ordinary neighbours; without a valley of
    depth <= 0.3, a decade below the closest 1% of neighbours, and the reason says there is no gap.
    docs/DUPLICATES.md has the details."""
    d = nn_distances(nearest)
    if len(d) < 2:
        return AutoChoice(1.0, False, "too few vectors to learn a threshold from: using cos >= 1.0 (identical only)")
    edges = np.arange(LOG_FLOOR - 0.05, math.log10(2.0) + 0.1, 0.05)
    hist, _ = np.histogram(d, bins=edges)
    kernel = np.exp(-0.5 * (np.arange(-6, 7) / 2.0) ** 2)
    smooth = np.convolve(hist.astype(np.float64), kernel / kernel.sum(), mode="same")
    centres = (edges[:-1] + edges[1:]) / 2
    peaks = [i for i in range(len(smooth)) if smooth[i] > 0 and smooth[i] >= smooth[max(0, i - 1)]]
    peaks = [i for i in peaks if smooth[i] >= smooth[min(len(smooth) - 1, i + 1)]]
    # The ordinary neighbours: the farthest peak with 5% of the images within half a decade of it.
    big = [i for i in peaks if hist[max(0, i - 10) : i + 11].sum() >= 0.05 * len(d)]
    bulk = max(big) if big else int(np.argmax(smooth))
    typical = 10 ** float(np.median(d[d >= centres[bulk] - 1.0])) if (d >= centres[bulk] - 1.0).any() else 0.0
    valleys = []
    for v in range(1, bulk):
        left = smooth[:v].max()
        if smooth[v] > smooth[v - 1] or smooth[v] > smooth[v + 1] or left <= 0 or (d < centres[v]).sum() < 2:
            continue
        valleys.append((smooth[v] / min(left, smooth[bulk]), v))
    deepest = min((depth for depth, _ in valleys), default=1.0)
    if deepest <= 0.3:
        # Of equally deep valleys the one nearest the ordinary neighbours: exact copies and re-encodes
        # can be two populations of their own, and both are near-duplicates.
        v = max(v for depth, v in valleys if depth <= deepest + 0.05)
        floor = smooth[v] + 0.02 * min(smooth[:v].max(), smooth[bulk])
        lo, hi = v, v
        while lo > 0 and smooth[lo - 1] <= floor:
            lo -= 1
        while hi < bulk and smooth[hi + 1] <= floor:
            hi += 1
        cut = (centres[lo] + centres[hi]) / 2
        below, above = d[d < cut], d[d >= cut]
        threshold = 1.0 - 10**cut
        reason = (
            f"cos >= {threshold:.5f} (1-cos {10**cut:.1e}), the middle of the gap between {len(below):,} images "
            f"whose closest neighbour is within 1-cos {10 ** below.max():.1e} and {len(above):,} whose closest is "
            f"no nearer than {10 ** above.min():.1e} (typical closest neighbour: cos {1 - typical:.4f})"
        )
        return AutoChoice(float(threshold), True, reason)
    low = float(np.percentile(d, 1)) - 1.0
    threshold = 1.0 - 10**low
    reason = (
        f"no gap between near-duplicates and ordinary neighbours (typical closest neighbour: cos "
        f"{1 - typical:.4f}); using cos >= {threshold:.5f}, 10x closer than the closest 1% of neighbours, so only "
        "the closest copies group: look at the histogram and pass --threshold"
    )
    return AutoChoice(float(threshold), False, reason)
