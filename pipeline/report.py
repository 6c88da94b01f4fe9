"""`embedpipe report`: one self-contained HTML page over the nightly runs of a root.

Per night: counts, failures by reason, wall time and speed, index type and claimed recall; drift
between consecutive runs (vectors of unchanged bytes must not move; nearest-neighbour distances
tonight vs last time); the index's recall-vs-search-parameter curve; the worst failures. Images
are inline data: URIs and there is no script, so the file opens anywhere, offline.

`embedpipe nightly` writes ROOT/runs/<id>/report.html after publishing each run
(`write_run_report`); `latest_report_path` finds the newest one for the server.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import logging
import sys
import time
from typing import TYPE_CHECKING

from apache_beam.io.filesystems import FileSystems

from pipeline.errors import UsageError, refuse_unusable_paths
from pipeline.options.runner import use_filesystem_options
from pipeline.runs import Night, load_nights, previous_of

if TYPE_CHECKING:
    from pipeline.report_drift import PairCheck

from pipeline.storage import read_json, write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)

REPORT_NAME = "report.html"
DEFAULT_LAST = 14


@dataclasses.dataclass
class Report:
    """A rendered report and what it found."""

    html: str
    nights: list[Night]
    checks: list[PairCheck]  # one per pair of consecutive runs
    alerts: list[str]

    @property
    def drift_flagged(self) -> bool:
        """True when vectors of unchanged bytes moved beyond the tolerance between some pair of runs."""
        return any(c.status == "flagged" for c in self.checks)


def build_report(
    root: str,
    *,
    last: int = DEFAULT_LAST,
    newest: str | None = None,
    tolerance: float | None = None,
    check_sample: int | None = None,
    nn_sample: int | None = None,
    read_budget: int | None = None,
) -> Report:
    """Render the report of ROOT's last `last` runs (ending at `newest`, default the newest run)."""
    from pipeline import report_drift as drift
    from pipeline.report_sections import render

    tolerance = drift.DEFAULT_TOLERANCE if tolerance is None else tolerance
    limits = {
        "check_sample": check_sample or drift.DEFAULT_CHECK_SAMPLE,
        "read_budget": read_budget or drift.DEFAULT_READ_BUDGET,
    }
    nn_sample = nn_sample or drift.DEFAULT_NN_SAMPLE
    started = time.perf_counter()
    nights = load_nights(root, last=last, newest=newest)
    checks, notes, neighbours = [], [], None
    rows: dict[str, drift.RunRows] = {}  # each run's keys are read once, whichever pair needs them

    def rows_of(night):
        if night.run_dir not in rows:
            rows[night.run_dir] = drift.RunRows(night.run_dir)
        return rows[night.run_dir]

    for night in nights:
        before = previous_of(night, nights)
        if night.manifest is None or (before is None and night is not nights[-1]):
            continue
        comparable = before is not None and night.manifest.get("model") == before.manifest.get("model")
        if before is not None and not comparable:
            checks.append(drift.PairCheck(night.run_id, before.run_id, "model changed", 0, 0))
        settings = {"previous": before.run_id if before else None, "tolerance": tolerance, **limits}
        cached = _cached_check(night.run_dir, settings) if comparable and night is not nights[-1] else None
        if cached is not None:  # an earlier night's check: measured when its report was written
            checks.append(cached)
            continue
        try:
            run = rows_of(night)
            previous = rows_of(before) if comparable else None
            sample = drift.joined_keys(run, previous)
            if previous is not None:
                names = (night.run_id, before.run_id)
                check = drift.check_unchanged(run, previous, sample, names=names, tolerance=tolerance, **limits)
                checks.append(check)
                _cache_check(night.run_dir, settings, check)
            if night is nights[-1]:  # tonight's neighbours: measured even with nothing to compare them with
                neighbours = drift.neighbour_drift(
                    run, previous, sample, nn_sample=nn_sample, read_budget=limits["read_budget"]
                )
                neighbours.previous_run = before.run_id if comparable else None
        except Exception as exc:  # one unreadable run must not hide the rest of the page
            against = f" vs {before.run_id}" if before else ""
            log.warning("report: drift of %s%s not measured: %s", night.run_id, against, exc)
            notes.append(f"drift of {night.run_id}{against} not measured: {type(exc).__name__}: {exc}")
    facts = {
        "root": root.rstrip("/"),
        "latest": _latest(root),
        "generated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "tolerance": tolerance,
        "nn_sample": nn_sample,
        **limits,
        "notes": notes,
    }
    html, alerts = render(nights, checks, neighbours, facts)
    log.info("report: %d runs, %d drift checks in %.1fs", len(nights), len(checks), time.perf_counter() - started)
    return Report(html, nights, checks, alerts)


DRIFT_CACHE = "drift.json"  # a run's check against its previous run, kept beside its report


def _cached_check(run_dir: str, settings: dict):
    """The drift check stored for this run with these settings, or None."""
    from pipeline import report_drift as drift

    try:
        stored = read_json(f"{run_dir}/{DRIFT_CACHE}")
    except ValueError:
        return None
    if not isinstance(stored, dict) or stored.get("settings") != settings:
        return None
    try:
        check = dict(stored["check"])
        check["worst"] = [tuple(w) for w in check.get("worst", [])]
        return drift.PairCheck(**check)
    except (KeyError, TypeError):
        return None


def _cache_check(run_dir: str, settings: dict, check) -> None:
    try:
        write_json_atomic(f"{run_dir}/{DRIFT_CACHE}", {"settings": settings, "check": dataclasses.asdict(check)})
    except Exception as exc:  # a read-only root: the check is measured again next time
        log.debug("report: drift check of %s not cached: %s", run_dir, exc)


def _latest(root: str) -> str | None:
    from pipeline.runs import read_latest

    try:
        return read_latest(root.rstrip("/"))
    except ValueError:
        return None


def write_run_report(root: str, run_id: str, *, last: int = DEFAULT_LAST) -> tuple[str, Report]:
    """(path, report) of ROOT/runs/<run_id>/report.html, over the `last` runs up to run_id, written atomically."""
    report = build_report(root, last=last, newest=run_id)
    path = f"{root.rstrip('/')}/runs/{run_id}/{REPORT_NAME}"
    write_text_atomic(path, report.html)
    return path, report


def latest_report_path(path: str) -> str | None:
    """The newest report for a nightly root, a run folder or a run's index folder; None when there is none.

    ROOT -> ROOT/runs/<LATEST>/report.html, else the report of the newest run that has one (a night
    run with --no-report, or whose report failed); RUN_DIR or RUN_DIR/index -> RUN_DIR/report.html.
    """
    base = path.rstrip("/")
    candidates = []
    latest = _latest(base) if FileSystems.exists(f"{base}/LATEST") else None
    if latest:
        candidates.append(f"{base}/runs/{latest}/{REPORT_NAME}")
    candidates.append(f"{base}/{REPORT_NAME}")
    if base.endswith("/index"):
        candidates.append(f"{base[: -len('/index')]}/{REPORT_NAME}")
    found = next((c for c in candidates if FileSystems.exists(c)), None)
    if found or not latest:
        return found
    try:
        pages = [m.path for m in FileSystems.match([f"{base}/runs/*/{REPORT_NAME}"])[0].metadata_list]
    except Exception:  # nothing matched, on filesystems that raise for that
        pages = []
    return max(pages, key=lambda p: p.rsplit("/", 2)[-2], default=None)


def add_report_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `report` subcommand (func=cmd_report) to the `embedpipe` parser."""
    from pipeline import report_drift as drift

    p = subparsers.add_parser(
        "report",
        help="an HTML report of the nightly runs under a root (counts, failures, drift, recall)",
        description="Write one self-contained HTML page over the runs under --root: per night what was seen, "
        "embedded, reused and failed (and why), wall time and speed, index type and recall; whether vectors of "
        "unchanged images moved between runs; nearest-neighbour distances tonight vs the previous run; the "
        "index's recall curve; the worst failures. docs/REPORT.md explains every part.",
    )
    p.add_argument("--root", required=True, help="run root of `embedpipe nightly` (local, gs://, s3://)")
    p.add_argument("--output", default=REPORT_NAME, help=f"HTML file to write (default {REPORT_NAME})")
    p.add_argument("--last", type=int, default=DEFAULT_LAST, help=f"runs to show, newest last (default {DEFAULT_LAST})")
    p.add_argument(
        "--drift-tolerance",
        type=float,
        default=drift.DEFAULT_TOLERANCE,
        help="largest relative distance |a - b| / |a| allowed between the vectors of an unchanged image in two "
        f"runs (default {drift.DEFAULT_TOLERANCE:g})",
    )
    p.add_argument(
        "--sample",
        type=int,
        default=drift.DEFAULT_NN_SAMPLE,
        help=f"images whose nearest neighbour is looked up in both runs (default {drift.DEFAULT_NN_SAMPLE:,})",
    )
    p.set_defaults(func=cmd_report)
    return p


def cmd_report(args: argparse.Namespace, beam_args: list[str]) -> None:
    """Run `embedpipe report`: write the page, print its alerts; a root or output that cannot be used raises."""
    if args.last < 1 or args.sample < 1 or args.drift_tolerance < 0:
        raise UsageError("--last and --sample must be >= 1, --drift-tolerance >= 0")
    use_filesystem_options(beam_args)  # credentials of remote filesystems
    with refuse_unusable_paths():
        report = build_report(args.root, last=args.last, tolerance=args.drift_tolerance, nn_sample=args.sample)
        write_text_atomic(args.output, report.html)
    for alert in report.alerts:
        print(f"embedpipe report: ALERT: {alert}", file=sys.stderr)
    print(f"embedpipe report: {len(report.nights)} runs -> {args.output}")
