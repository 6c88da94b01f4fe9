"""Plots (matplotlib, Agg, inline PNG) and the HTML shell of the self-contained pages: the nightly
report (pipeline/report.py) and the near-duplicate groups (pipeline/index/duplicates_page.py).

Figures are made with `matplotlib.figure.Figure` directly, never pyplot: no global state and no
display, so a server may render pages from several threads.
"""

from __future__ import annotations

import base64
import html
import io
import math

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

COLOURS = {
    "embedded": "#2457c5",
    "reused": "#8fb3f0",
    "failed": "#b3261e",
    "tonight": "#2457c5",
    "previous": "#9aa3b2",
    "threshold": "#b3261e",
}
# Nothing may load from elsewhere: images are data: URIs, styles inline, no scripts.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
CSS = """
:root { --fg: #1d2330; --muted: #5d6677; --line: #d8dce4; --accent: #2457c5; --bad: #b3261e; --ok: #1e7b34; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--fg);
       background: #f6f7f9; }
header { padding: 14px 20px; background: #fff; border-bottom: 1px solid var(--line); }
header h1 { margin: 0 0 4px; font-size: 19px; }
.muted, header p { color: var(--muted); margin: 2px 0; }
main { padding: 8px 20px 40px; max-width: 1280px; }
section { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 12px 16px; margin: 14px 0; }
h2 { font-size: 16px; margin: 0 0 8px; }
table { border-collapse: collapse; font-size: 13px; margin: 6px 0; }
th, td { border-bottom: 1px solid var(--line); padding: 4px 8px; text-align: left; vertical-align: top; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
.alert { border: 2px solid var(--bad); background: #fdf0ef; color: var(--bad); border-radius: 8px;
         padding: 10px 14px; margin: 14px 0; font-weight: 600; }
.note { border-left: 4px solid var(--line); padding: 2px 10px; color: var(--muted); margin: 8px 0; }
.ok { color: var(--ok); font-weight: 600; }
.bad { color: var(--bad); font-weight: 600; }
img.plot { max-width: 100%; height: auto; display: block; margin: 6px 0; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(150px, 1fr)); gap: 10px; }
.grid.wide { grid-template-columns: repeat(auto-fill, minmax(280px, 1fr)); }
.plots { display: grid; grid-template-columns: repeat(auto-fit, minmax(520px, 1fr)); gap: 8px; }
figure { margin: 0; padding: 6px; border: 1px solid var(--line); border-radius: 6px; background: #fff; }
figure .thumb { display: flex; align-items: center; justify-content: center; height: 132px; background: #eceef2;
                border-radius: 4px; color: var(--muted); font-size: 12px; }
figure img { max-width: 100%; max-height: 128px; }
figcaption { font-size: 12px; word-break: break-all; margin-top: 4px; }
code, .msg { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 12px; word-break: break-all; }
"""


def esc(value: object) -> str:
    """Text or attribute value, HTML-escaped (quotes too)."""
    return html.escape("" if value is None else str(value), quote=True)


def page(title: str, header: str, body: str) -> str:
    """A whole self-contained HTML document."""
    return (
        '<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{esc(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
        f"<header>{header}</header>\n<main>\n{body}\n</main>\n</body>\n</html>\n"
    )


def data_uri(data: bytes, mime: str) -> str:
    """bytes as a data: URI."""
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def thumbnail_html(data: bytes | None, alt: str) -> str:
    """A thumbnail box: the stored JPEG inline, or a note that there is none."""
    if not data:
        return '<div class="thumb">no thumbnail</div>'
    return f'<div class="thumb"><img src="{data_uri(data, "image/jpeg")}" alt="{esc(alt)}"></div>'


def _figure(width: float = 8.0, height: float = 3.2) -> Figure:
    fig = Figure(figsize=(width, height), dpi=96, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def png_img(fig: Figure, alt: str, name: str) -> str:
    """<img> of a figure as an inline PNG; `name` becomes data-plot (what the figure shows)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    uri = data_uri(buffer.getvalue(), "image/png")
    return f'<img class="plot" data-plot="{esc(name)}" src="{uri}" alt="{esc(alt)}">'


def _run_axis(ax, labels: list[str]) -> None:
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=30 if len(labels) > 4 else 0, ha="right" if len(labels) > 4 else "center")
    ax.grid(axis="y", alpha=0.3)


def counts_plot(runs: list[str], embedded: list[int], reused: list[int], failed: list[int]) -> str:
    """Stacked bars per night: embedded + reused + failed (= seen)."""
    fig = _figure()
    ax = fig.add_subplot()
    x = np.arange(len(runs))
    bottom = np.zeros(len(runs))
    for name, values in (("embedded", embedded), ("reused", reused), ("failed", failed)):
        ax.bar(x, values, bottom=bottom, color=COLOURS[name], label=name, width=0.6)
        bottom += np.asarray(values, dtype=float)
    _run_axis(ax, runs)
    ax.set_ylabel("images")
    ax.set_title("images seen per night")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    return png_img(fig, "images seen per night: embedded, reused and failed", "counts")


def reasons_plot(runs: list[str], by_reason: list[dict[str, int]]) -> str:
    """Stacked bars per night of the failures by reason code."""
    fig = _figure()
    ax = fig.add_subplot()
    reasons = sorted({r for d in by_reason for r in d})
    x = np.arange(len(runs))
    bottom = np.zeros(len(runs))
    cmap = matplotlib.colormaps["tab10"]
    for i, reason in enumerate(reasons):
        values = np.array([d.get(reason, 0) for d in by_reason], dtype=float)
        ax.bar(x, values, bottom=bottom, label=reason, width=0.6, color=cmap(i % 10))
        bottom += values
    if not reasons:
        ax.text(0.5, 0.5, "no failures", transform=ax.transAxes, ha="center", va="center", color="#5d6677")
    _run_axis(ax, runs)
    ax.set_ylabel("images")
    ax.set_title("failures by reason")
    if reasons:
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    return png_img(fig, "failures per night by reason code", "failures")


def timing_plot(runs: list[str], wall: list[float | None], speed: list[float | None]) -> str:
    """Wall time (bars) and images per second (line) per night."""
    fig = _figure()
    ax = fig.add_subplot()
    x = np.arange(len(runs))
    ax.bar(x, [w or 0 for w in wall], color="#c9d3e6", width=0.6, label="wall time (s)")
    ax.set_ylabel("wall time (s)")
    _run_axis(ax, runs)
    right = ax.twinx()
    right.plot(x, [s if s is not None else np.nan for s in speed], "o-", color=COLOURS["embedded"], label="img/s")
    right.set_ylabel("embedded images / s")
    right.set_ylim(bottom=0)
    ax.set_title("wall time and embedding speed")
    return png_img(fig, "wall time and embedded images per second per night", "timing")


def tuning_plot(curve: list[dict], param: str, chosen: int | None, target: float | None, held_out: float | None) -> str:
    """Recall@10 against the search parameter, as measured while the index was tuned."""
    fig = _figure(7.0, 3.2)
    ax = fig.add_subplot()
    xs = [row[param] for row in curve]
    ax.plot(xs, [row["recall_tuning"] for row in curve], "o-", color=COLOURS["tonight"], label="tuning queries")
    ax.plot(xs, [row.get("self_first", np.nan) for row in curve], ".:", color="#6b8e23", label="finds itself first")
    held = [(row[param], row["recall_held_out"]) for row in curve if "recall_held_out" in row]
    if held:
        ax.plot(*zip(*held), "s", color="#e08a00", label="held-out queries")
    if target is not None:
        ax.axhline(target, color=COLOURS["threshold"], ls="--", lw=1, label=f"target {target:g}")
    if chosen is not None:
        ax.axvline(chosen, color="#5d6677", ls=":", lw=1, label=f"chosen {param}={chosen}")
    if len(set(xs)) > 1 and min(xs) > 0:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(param)
    ax.set_ylabel("recall@10")
    ax.grid(alpha=0.3)
    title = f"recall vs {param}" + (f" (held-out recall@10 {held_out:.3f})" if held_out is not None else "")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8, frameon=False)
    return png_img(fig, f"recall@10 against {param} measured while tuning the index", "tuning")


def _log_bins(*samples: np.ndarray) -> np.ndarray:
    values = np.concatenate([s for s in samples if len(s)]) if any(len(s) for s in samples) else np.zeros(1)
    lo, hi = math.floor(values.min() * 4) / 4, math.ceil(values.max() * 4) / 4
    return np.linspace(lo - 0.25, hi + 0.25, max(10, int((hi - lo + 0.5) * 8)) + 1)


def nn_pair_plot(tonight: np.ndarray, previous: np.ndarray, labels: tuple[str, str], metric: str) -> str:
    """Histogram pair of log10 distance to the nearest neighbour: tonight above, the previous run below."""
    fig = _figure(8.0, 4.2)
    bins = _log_bins(tonight, previous)
    top, bottom = fig.subplots(2, 1, sharex=True)
    for ax, values, label, colour in ((top, tonight, labels[0], "tonight"), (bottom, previous, labels[1], "previous")):
        if len(values):
            ax.hist(values, bins=bins, color=COLOURS[colour])
            ax.axvline(float(np.median(values)), color="#1d2330", ls="--", lw=1)
        else:
            ax.text(0.5, 0.5, "no sample", transform=ax.transAxes, ha="center", va="center", color="#5d6677")
        ax.set_ylabel("images")
        ax.set_title(f"{label}: {len(values):,} images (dashed: median)", fontsize=10)
        ax.grid(alpha=0.3)
    unit = "1 - cos" if metric == "cosine" else "L2 distance"
    bottom.set_xlabel(f"log10({unit}) to the nearest neighbour")
    return png_img(fig, "distance to the nearest neighbour, tonight and the previous run", "nn-distance")


def threshold_plot(edges: list[float], counts: list[int], threshold: float) -> str:
    """Histogram of log10(1 - cos) to each image's closest other, with the duplicate threshold."""
    fig = _figure(8.0, 3.0)
    ax = fig.add_subplot()
    edges_a = np.asarray(edges, dtype=float)
    ax.bar(edges_a[:-1], counts, width=np.diff(edges_a), align="edge", color=COLOURS["tonight"])
    if threshold < 1.0:
        cut = math.log10(max(1.0 - threshold, 1e-7))
        ax.axvline(cut, color=COLOURS["threshold"], lw=1.5, label=f"threshold cos {threshold:.5f}")
        ax.legend(loc="upper left", fontsize=8, frameon=False)
    ax.set_yscale("symlog", linthresh=1)
    ax.set_xlabel("log10(1 - cos) to the closest other image (left of the line: grouped)")
    ax.set_ylabel("images")
    ax.grid(alpha=0.3)
    return png_img(fig, "distance of each image to its closest other, with the threshold", "threshold")
