"""The sections of the nightly report (pipeline/report.py): nights, drift, index, worst failures.

Every figure on the page also has its numbers in a table beside it (with data-field attributes),
so what the plots show can be read, copied and checked.
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING

import numpy as np
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from pipeline import reasons
from pipeline.report_plots import (
    counts_plot,
    esc,
    nn_pair_plot,
    page,
    reasons_plot,
    thumbnail_html,
    timing_plot,
    tuning_plot,
)
from pipeline.storage import parquet_files

if TYPE_CHECKING:
    from pipeline.report_drift import NeighbourDrift, PairCheck
    from pipeline.runs import Night

# Worst first: failures that point at the pipeline or lose many images, then bad input files.
SEVERITY = (
    reasons.EMPTY_INPUT,
    reasons.EMBED_ERROR,
    reasons.TRUNCATED_SHARD,
    reasons.CORRUPT_RECORD,
    reasons.UNREADABLE,
    reasons.DECODE_ERROR,
    reasons.TRUNCATED,
    reasons.TOO_MANY_PIXELS,
    reasons.TOO_LARGE,
    reasons.NOT_AN_IMAGE,
    reasons.EMPTY_FILE,
    reasons.DUPLICATE_ID,
)
WORST = 5
COUNT_FIELDS = ("seen", "embedded", "reused", "reused_by_marker", "failed", "deleted")


def _num(value, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}" if isinstance(value, float) else f"{value:,}"


def _cell(field: str, value, digits: int = 0) -> str:
    raw = "" if value is None else value
    return f'<td class="num" data-field="{field}" data-value="{esc(raw)}">{_num(value, digits)}</td>'


def alerts_of(nights: list[Night], checks: list[PairCheck]) -> list[str]:
    """One line per thing someone should look at today."""
    out = []
    for c in checks:
        if c.status == "flagged":
            moved = ", ".join(i for i, _ in c.worst[:3])
            out.append(
                f"DRIFT: vectors of unchanged images moved between {c.previous} and {c.run}: max |a-b|/|a| "
                f"{c.max_relative_l2:.2e} over {c.checked:,} images checked ({moved})"
            )
    newest = nights[-1]
    m = newest.manifest
    if m is None:
        out.append(f"run {newest.run_id} is unfinished: it has no manifest.json (killed or still running)")
        return out
    if not m.get("published"):
        out.append(f"run {newest.run_id} was NOT published: {m.get('validation_error', 'no reason recorded')}")
    for message in m.get("empty_inputs") or ():
        out.append(f"run {newest.run_id}: an input holds no image: {message}")
    c = newest.counts
    if c and c.get("seen") != c.get("embedded", 0) + c.get("reused", 0) + c.get("failed", 0):
        out.append(f"run {newest.run_id}: counts do not add up: {c}")
    index = newest.index or {}
    if index.get("recall_target_met") is False:
        out.append(f"run {newest.run_id}: index recall@10 {index.get('recall_at_10')} misses its target: "
                   f"{index.get('recall_warning') or index.get('recall_target')}")  # fmt: skip
    return out


def nights_section(nights: list[Night]) -> str:
    """The table of nights and the three per-night figures."""
    rows = []
    for n in nights:
        m, c = n.manifest or {}, n.counts
        idx = m.get("index") or n.index or {}
        recall = idx.get("recall_at_10")
        low = (n.index or {}).get("recall_at_10_low")
        met = (n.index or {}).get("recall_target_met")
        status = n.status if n.status != "not published" else f"not published: {m.get('validation_error', '')}"
        rows.append(
            f'<tr data-run="{esc(n.run_id)}" data-status="{esc(n.status)}"><td><code>{esc(n.run_id)}</code></td>'
            f'<td class="{"ok" if n.status == "published" else "bad"}">{esc(status)}</td>'
            f"<td>{esc(m.get('mode', '-'))}</td>"
            + "".join(_cell(f, c.get(f)) for f in COUNT_FIELDS)
            + _cell("wall_seconds", m.get("wall_seconds"), 1)
            + _cell("images_per_second", m.get("images_per_second"), 1)
            + f'<td data-field="index_type">{esc(idx.get("index_type", "-"))}</td>'
            + _cell("ntotal", idx.get("ntotal"))
            + _cell("recall_at_10", recall, 3)
            + f'<td class="num">{_num(low, 3)}</td><td>{"-" if met is None else ("yes" if met else "NO")}</td></tr>'
        )
    head = "".join(
        f"<th{' class=num' if i > 2 else ''}>{h}</th>"
        for i, h in enumerate(
            ("run", "status", "mode", "seen", "embedded", "reused", "by marker", "failed", "deleted", "wall s",
             "img/s", "index", "vectors", "recall@10", "lower bound", "target met")
        )
    )  # fmt: skip
    done = [n for n in nights if n.manifest is not None]
    labels = [n.run_id for n in done]
    plots = ""
    if done:
        plots = '<div class="plots">' + (
            counts_plot(labels, *[[n.counts.get(f, 0) for n in done] for f in ("embedded", "reused", "failed")])
            + reasons_plot(labels, [(n.manifest.get("failed_by_reason") or {}) for n in done])
            + timing_plot(labels, [n.manifest.get("wall_seconds") for n in done],
                          [n.manifest.get("images_per_second") for n in done])
        ) + "</div>"  # fmt: skip
    reason_rows = "".join(
        f'<tr data-run="{esc(n.run_id)}"><td><code>{esc(n.run_id)}</code></td><td>'
        + (", ".join(f"{esc(r)} {k:,}" for r, k in sorted((n.manifest.get("failed_by_reason") or {}).items())) or "-")
        + "</td></tr>"
        for n in done
    )
    return (
        '<section id="nights"><h2>Nights</h2>'
        '<p class="muted">seen = embedded + reused + failed. Wall time: the whole night (embedding, index, '
        "checks); img/s: images embedded per second of the embedding job.</p>"
        f'<table id="nights-table"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>{plots}'
        f'<table id="reasons-table"><thead><tr><th>run</th><th>failures by reason</th></tr></thead>'
        f"<tbody>{reason_rows}</tbody></table></section>"
    )


def drift_section(checks: list[PairCheck], neighbours: NeighbourDrift | None, facts: dict) -> str:
    """Unchanged-bytes checks per pair of runs, and the nearest-neighbour histogram pair."""
    rows = []
    for c in checks:
        cls = {"ok": "ok", "flagged": "bad"}.get(c.status, "muted")
        worst = ", ".join(f"{esc(i)} ({d:.1e})" for i, d in c.worst) or "-"
        rows.append(
            f'<tr data-run="{esc(c.run)}" data-previous="{esc(c.previous)}" data-status="{esc(c.status)}">'
            f"<td><code>{esc(c.previous)}</code> &rarr; <code>{esc(c.run)}</code></td>"
            f'<td class="{cls}">{esc(c.status.upper() if c.status == "flagged" else c.status)}</td>'
            + _cell("unchanged", c.unchanged)
            + _cell("checked", c.checked)
            + f'<td class="num" data-field="max_relative_l2" data-value="{esc(c.max_relative_l2)}">'
            f"{'-' if c.max_relative_l2 is None else f'{c.max_relative_l2:.2e}'}</td>"
            f'<td class="num" data-field="max_cos_distance">'
            f"{'-' if c.max_cos_distance is None else f'{c.max_cos_distance:.2e}'}</td>"
            f"<td>{worst}</td><td>{'sample' if c.sampled else 'all'}</td></tr>"
        )
    table = (
        '<table id="drift-table"><thead><tr><th>runs</th><th>status</th><th class="num">unchanged images</th>'
        '<th class="num">checked</th><th class="num">max |a-b|/|a|</th><th class="num">max 1-cos</th>'
        f"<th>moved most</th><th>checked</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
        if rows
        else '<p class="muted">Only one run: nothing to compare yet.</p>'
    )
    nn = ""
    if neighbours is not None:
        share = neighbours.changed / neighbours.compared if neighbours.compared else None
        nn = (
            nn_pair_plot(
                neighbours.tonight,
                neighbours.previous,
                ("tonight", f"previous run {neighbours.previous_run or '(none comparable)'}"),
                neighbours.metric,
            )
            + f'<p id="nn-changed" data-compared="{neighbours.compared}" data-changed="{neighbours.changed}">'
            f"Nearest neighbour changed for <b>{neighbours.changed:,}</b> of {neighbours.compared:,} sampled images "
            f"that are in both runs ({'-' if share is None else f'{share:.1%}'}). Sample: {len(neighbours.tonight):,} "
            f"of tonight's {neighbours.sampled_of:,} images (at most {facts['nn_sample']:,}), searched in each run's "
            "own index in batches of 256. New or deleted images change neighbours too.</p>"
        )
    return (
        '<section id="drift"><h2>Drift</h2>'
        f"<p>Images with the same id and content_sha256 in two consecutive runs must keep their vector: flagged "
        f"when |a - b| / |a| exceeds {facts['tolerance']:g} for any of them. Work is bounded: ids are sampled "
        f"deterministically (crc32 of the id) when a run holds more than a few hundred thousand, at most "
        f"{facts['check_sample']:,} pairs are compared and at most {facts['read_budget'] >> 20:,} MiB of vectors "
        f"are read per run.</p>{table}{nn}</section>"
    )


def index_section(nights: list[Night]) -> str:
    """The newest index's facts and its recall-vs-parameter curve."""
    night = next((n for n in reversed(nights) if n.index), None)
    if night is None:
        return '<section id="index"><h2>Index</h2><p class="muted">No run has an index.json.</p></section>'
    meta = night.index
    curve = meta.get("tuning_curve") or []
    params = meta.get("search_params") or {}
    facts = (
        f"<p>Run <code>{esc(night.run_id)}</code>: {esc(meta.get('index_type'))} <code>{esc(meta.get('factory'))}"
        f"</code>, {_num(meta.get('ntotal'))} vectors, search {esc(params or 'exact')}; recall@10 claimed "
        f"<b>{_num(meta.get('recall_at_10'), 3)}</b> (95% lower bound {_num(meta.get('recall_at_10_low'), 3)}) on "
        f"{_num(meta.get('recall_queries'))} held-out queries, target {_num(meta.get('recall_target'), 2)}, "
        f"{'met' if meta.get('recall_target_met') else 'NOT met' if meta.get('recall_target_met') is False else '-'}"
        f".</p>"
    )
    if not curve:
        body = '<p class="muted">Exact index: every query meets every vector: no search parameter to tune.</p>'
        return f'<section id="index"><h2>Index</h2>{facts}{body}</section>'
    param = next(k for k in ("nprobe", "efSearch") if k in curve[0])
    rows = "".join(
        f'<tr data-{esc(param.lower())}="{r[param]}"><td class="num">{r[param]}</td>'
        + _cell("recall_tuning", r.get("recall_tuning"), 4)
        + _cell("recall_held_out", r.get("recall_held_out"), 4)
        + _cell("self_first", r.get("self_first"), 4)
        + "</tr>"
        for r in curve
    )
    plot = tuning_plot(curve, param, params.get(param), meta.get("recall_target"), meta.get("recall_at_10"))
    return (
        f'<section id="index"><h2>Index</h2>{facts}{plot}<table id="tuning-table"><thead><tr>'
        f'<th class="num">{esc(param)}</th><th class="num">recall (tuning)</th><th class="num">recall (held-out)</th>'
        f'<th class="num">finds itself first</th></tr></thead><tbody>{rows}</tbody></table></section>'
    )


def worst_failures(night: Night, previous: Night | None) -> list[dict]:
    """Up to WORST error rows of a run: images that were fine last time first, then by severity,
    one per reason before a second of any; each with a stored thumbnail when a run holds one."""
    from pipeline.report_drift import RunRows

    candidates: dict[str, list[dict]] = collections.defaultdict(list)
    for path in parquet_files(f"{night.run_dir}/errors"):
        with FileSystems.open(path, compression_type="uncompressed") as handle:
            for batch in pq.ParquetFile(handle).iter_batches(batch_size=65536):
                for at, code in enumerate(batch.column("error").to_pylist()):  # only the codes of every row
                    if len(candidates[code]) < WORST:
                        candidates[code].append(batch.slice(at, 1).to_pylist()[0])
    rows = [r for group in candidates.values() for r in group]
    if not rows:
        return []
    ids = [r["id"] for r in rows]
    sources = []
    for run in (night, previous):
        if run is not None:
            try:
                sources.append((run, RunRows(run.run_dir)))
            except Exception:  # an unreadable run only costs its thumbnails
                continue
    known = {run.run_id: rr.find(ids) for run, rr in sources}
    was_fine = set(known.get(previous.run_id, {})) if previous is not None else set()
    rank = {code: i for i, code in enumerate(SEVERITY)}
    rows.sort(key=lambda r: (r["id"] not in was_fine, rank.get(r["error"], len(SEVERITY)), r["id"]))
    chosen, seen = [], set()
    for second_pass in (False, True):
        for r in rows:
            if len(chosen) < WORST and r not in chosen and (second_pass or r["error"] not in seen):
                chosen.append(r)
                seen.add(r["error"])
    for r in chosen:
        r["was_fine"] = r["id"] in was_fine
        r["thumbnail"] = None
        for run, rr in sources:
            position = known[run.run_id].get(r["id"])
            if position is not None and "thumbnail" in rr.columns:
                r["thumbnail"] = rr.read(np.array([position]), ("thumbnail",)).column("thumbnail")[0].as_py()
                if r["thumbnail"]:
                    break
    return chosen


def failures_section(nights: list[Night]) -> str:
    """The newest night's worst failures."""
    from pipeline.runs import previous_of

    night = nights[-1]
    if night.manifest is None:
        return '<section id="failures"><h2>Worst failures</h2><p class="muted">The run is unfinished.</p></section>'
    examples = worst_failures(night, previous_of(night, nights))
    if not examples:
        return '<section id="failures"><h2>Worst failures</h2><p class="ok">No failures in this run.</p></section>'
    cards = "".join(
        f'<figure class="failure" data-id="{esc(r["id"])}" data-reason="{esc(r["error"])}">'
        f"{thumbnail_html(r['thumbnail'], r['id'])}<figcaption><b>{esc(r['error'])}</b> ({esc(r['stage'])})"
        f"{' &mdash; embedded fine in the previous run' if r['was_fine'] else ''}<br><code>{esc(r['id'])}</code>"
        f'<br><span class="msg">{esc(r["message"])}</span></figcaption></figure>'
        for r in examples
    )
    total = night.counts.get("failed", 0)
    return (
        f'<section id="failures"><h2>Worst failures</h2><p class="muted">{len(examples)} of {total:,} failures of '
        f"run <code>{esc(night.run_id)}</code>: images that embedded in the previous run first, then by reason "
        "(pipeline trouble before bad files), one per reason first. Thumbnails come from a run that embedded "
        f'the image.</p><div class="grid wide">{cards}</div></section>'
    )


def render(
    nights: list[Night], checks: list[PairCheck], neighbours: NeighbourDrift | None, facts: dict
) -> tuple[str, list[str]]:
    """(the whole page, its alerts)."""
    alerts = alerts_of(nights, checks)
    flagged = any(c.status == "flagged" for c in checks)
    alert_html = "".join(f'<div class="alert">{esc(a)}</div>' for a in alerts)
    notes = "".join(f'<p class="note">{esc(n)}</p>' for n in facts["notes"])
    body = (
        f'<div id="summary" data-drift="{"flagged" if flagged else "ok" if checks else "none"}" '
        f'data-alerts="{len(alerts)}">{alert_html}</div>'
        + nights_section(nights)
        + drift_section(checks, neighbours, facts)
        + index_section(nights)
        + failures_section(nights)
        + notes
    )
    header = (
        f"<h1>embedpipe nightly report</h1><p>root <code>{esc(facts['root'])}</code>, LATEST "
        f"<code>{esc(facts['latest'] or '-')}</code>; {len(nights)} runs, {esc(nights[0].run_id)} to "
        f"{esc(nights[-1].run_id)}; generated {esc(facts['generated'])}</p>"
    )
    return page(f"embedpipe report {nights[-1].run_id}", header, body), alerts
