"""`bigexp report <logdir>`: a markdown table and PNG plots, read back from the TensorBoard EVENT FILES.

Works on a compare logdir (<logdir>/<arm>/ runs side by side, optional <logdir>/gap/) or on one run directory,
finished or not: anything not logged yet (no validation so far, no img/s) shows as "—". Writes
<logdir>/report.md and <logdir>/plots/*.png, and prints the table.

Numbers per arm: final and best val top-1/top-5 (percent), final val loss, final train loss (mean over the last
logging window), wall time (last minus first event wall_time, seconds, all scalar events of the run), median
train img/s, steps, the largest weight norm of the scale-invariant groups. Differences are arm minus baseline
(the sgd arm when there is one).
"""
from __future__ import annotations

import math
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional

from bigexp.atomic import write_text_atomic

DASH = "—"
GAP_RUN = "gap"


# ---------------------------------------------------------------------------------------------- reading events
def has_event_files(d: Path) -> bool:
    return d.is_dir() and any("tfevents" in p.name for p in d.iterdir() if p.is_file())


def load_scalars(run_dir: Path | str) -> dict:
    """tag -> (steps, values) of every scalar in the event files of `run_dir` (not its subdirectories), by step.

    A step logged twice (a resumed run repeats the steps after its last checkpoint) keeps the later write.
    Tags with no step-wise meaning (hparam/*) are left out.
    """
    return {tag: (steps, values) for tag, (steps, values, _) in load_scalar_events(run_dir).items()}


def load_scalar_events(run_dir: Path | str) -> dict:
    """tag -> (steps, values, wall_times), as `load_scalars`, with each kept event's wall time (s since epoch)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = Path(run_dir)
    if not has_event_files(run_dir):
        return {}
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags().get("scalars", []):
        if tag.startswith("hparam/"):
            continue
        latest: dict = {}
        for ev in sorted(acc.Scalars(tag), key=lambda e: e.wall_time):
            latest[int(ev.step)] = (float(ev.value), float(ev.wall_time))
        steps = sorted(latest)
        out[tag] = (steps, [latest[s][0] for s in steps], [latest[s][1] for s in steps])
    return out


def find_runs(logdir: Path | str) -> dict:
    """name -> run directory: every direct subdirectory with event files (the arms, the gap run); the logdir itself
    when it holds scalars (a single run). A logdir root that only holds the custom-scalars layout is not a run."""
    logdir = Path(logdir)
    if not logdir.is_dir():
        raise FileNotFoundError(f"{logdir}: no such directory")
    runs = {}
    if load_scalars(logdir):
        runs[logdir.name or str(logdir)] = logdir
    for d in sorted(logdir.iterdir()):
        if d.is_dir() and not d.name.startswith(".") and has_event_files(d):
            runs[d.name] = d
    return runs


def run_arm(run_dir: Path) -> Optional[str]:
    """The arm (optim.optimizer) of a run, from the resolved config.yaml train() writes beside the events."""
    cfg = Path(run_dir) / "config.yaml"
    if not cfg.is_file():
        return None
    try:
        import yaml

        data = yaml.safe_load(cfg.read_text()) or {}
        return (data.get("optim") or {}).get("optimizer")
    except Exception:
        return None


# ---------------------------------------------------------------------------------------------- summaries
@dataclass
class ArmSummary:
    name: str
    arm: Optional[str]
    final_top1: Optional[float] = None
    best_top1: Optional[float] = None
    final_top5: Optional[float] = None
    best_top5: Optional[float] = None
    final_val_loss: Optional[float] = None
    final_train_loss: Optional[float] = None
    wall_time_s: Optional[float] = None
    median_img_per_s: Optional[float] = None
    steps: Optional[int] = None
    max_invariant_weight_norm: Optional[float] = None


COLUMNS = (  # (attribute, header, format)
    ("final_top1", "final top-1 %", "{:.2f}"),
    ("best_top1", "best top-1 %", "{:.2f}"),
    ("final_top5", "final top-5 %", "{:.2f}"),
    ("best_top5", "best top-5 %", "{:.2f}"),
    ("final_val_loss", "final val loss", "{:.4f}"),
    ("final_train_loss", "final train loss", "{:.4f}"),
    ("wall_time_s", "wall time s", "{:.1f}"),
    ("median_img_per_s", "median img/s", "{:.0f}"),
    ("steps", "steps", "{:d}"),
    ("max_invariant_weight_norm", "max ‖w‖ (invariant)", "{:.4g}"),
)


def _last(scalars, tag):
    s = scalars.get(tag)
    return s[1][-1] if s and s[1] else None


def _best(scalars, tag):
    s = scalars.get(tag)
    return max(s[1]) if s and s[1] else None


def summarize_run(name: str, events: Mapping, arm: Optional[str] = None) -> ArmSummary:
    """ArmSummary from `load_scalar_events` output; missing tags stay None."""
    sc = {t: (v[0], v[1]) for t, v in events.items()}
    s = ArmSummary(name=name, arm=arm)
    s.final_top1, s.best_top1 = _last(sc, "val/top1"), _best(sc, "val/top1")
    s.final_top5, s.best_top5 = _last(sc, "val/top5"), _best(sc, "val/top5")
    s.final_val_loss = _last(sc, "val/loss")
    s.final_train_loss = _last(sc, "train/loss")
    walls = [w for _, _, ws in events.values() for w in ws]
    if walls:
        s.wall_time_s = max(walls) - min(walls)
    ips = sc.get("train/img_per_s")
    if ips and ips[1]:
        s.median_img_per_s = statistics.median(ips[1])
    steps = [st for t, (sts, _) in sc.items() if not t.startswith("hparam/") for st in sts]
    if steps:
        s.steps = max(steps)
    norms = [max(v) for t, (_, v) in sc.items()
             if v and (m := re.match(r"^opt/(.+)/weight_norm$", t)) and m.group(1).startswith("scale_invariant")]
    if norms:
        s.max_invariant_weight_norm = max(norms)
    return s


def _fmt(v, spec: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return DASH
    if spec == "{:d}":
        return str(int(v))
    return spec.format(v)


def _fmt_diff(v, spec: str) -> str:
    if v is None:
        return DASH
    if spec == "{:d}":
        return f"{int(v):+d}"
    return spec.replace("{:", "{:+").format(v)


def markdown_table(headers: list, rows: list) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def arms_table(summaries: list) -> str:
    headers = ["run", "arm"] + [h for _, h, _ in COLUMNS]
    rows = [[s.name, s.arm or DASH] + [_fmt(getattr(s, a), f) for a, _, f in COLUMNS] for s in summaries]
    return markdown_table(headers, rows)


def pick_baseline(summaries: list) -> Optional[ArmSummary]:
    for s in summaries:
        if s.arm == "sgd" or (s.arm is None and s.name == "sgd"):
            return s
    return summaries[0] if summaries else None


def differences(summaries: list, baseline: ArmSummary) -> list:
    """[(name, {attr: value - baseline value or None})] for every summary other than the baseline."""
    out = []
    for s in summaries:
        if s is baseline:
            continue
        d = {}
        for a, _, _ in COLUMNS:
            x, y = getattr(s, a), getattr(baseline, a)
            d[a] = None if x is None or y is None else x - y
        out.append((s.name, d))
    return out


def differences_table(summaries: list, baseline: ArmSummary) -> str:
    headers = ["run − " + baseline.name] + [h for _, h, _ in COLUMNS]
    rows = [[name] + [_fmt_diff(d[a], f) for a, _, f in COLUMNS] for name, d in differences(summaries, baseline)]
    return markdown_table(headers, rows)


GAP_COLUMNS = (("gap/max_abs_logit", "max abs Δlogit"), ("gap/rel_max_abs_logit", "rel. max Δlogit"),
               ("gap/kl", "KL (nats)"), ("gap/top1_agreement", "top-1 agreement"),
               ("gap/min_layer_cosine", "min layer cos"), ("gap/max_direction_gap", "max direction gap"))


def gap_table(gap: Mapping) -> str:
    """Rows: the first probe, the last probe and the worst value over training, per gap metric."""
    cols = [(t, h) for t, h in GAP_COLUMNS if t in gap and gap[t][1]]
    if not cols:
        return ""
    worse_is_low = {"gap/top1_agreement", "gap/min_layer_cosine"}
    rows = []
    for label, pick in (("first probe", lambda s, v, t: (s[0], v[0])), ("last probe", lambda s, v, t: (s[-1], v[-1])),
                        ("worst", lambda s, v, t: min(zip(s, v), key=lambda p: p[1]) if t in worse_is_low
                         else max(zip(s, v), key=lambda p: p[1]))):
        row = [label]
        for t, _ in cols:
            st, val = pick(gap[t][0], gap[t][1], t)
            row.append(f"{val:.3g} (step {st})")
        rows.append(row)
    return markdown_table(["probe"] + [h for _, h in cols], rows)


# ---------------------------------------------------------------------------------------------- the report
@dataclass
class ReportResult:
    logdir: Path
    report_path: Path
    plots: list
    summaries: list
    baseline: Optional[ArmSummary]
    gap: dict = field(default_factory=dict)
    text: str = ""


def build_report(logdir: Path | str, *, plots: bool = True) -> ReportResult:
    """Read every run under `logdir`, write report.md (and plots/*.png), return what was found."""
    from bigexp.analysis import plots as plotting

    logdir = Path(logdir)
    runs = find_runs(logdir)
    gap_events = load_scalar_events(runs.pop(GAP_RUN)) if GAP_RUN in runs else {}
    gap = {t: (v[0], v[1]) for t, v in gap_events.items()}
    # Runs whose event files hold no scalars (e.g. a comparison's layout-only root inside a parent dir) are skipped.
    events = {name: ev for name, ev in ((n, load_scalar_events(d)) for n, d in runs.items()) if ev}
    if not events and not gap:
        raise FileNotFoundError(f"{logdir}: no TensorBoard event files with scalars here or in its subdirectories")
    summaries, scalars = [], {}
    for name, ev in events.items():
        scalars[name] = {t: (v[0], v[1]) for t, v in ev.items()}
        summaries.append(summarize_run(name, ev, run_arm(runs[name])))
    baseline = pick_baseline(summaries)
    if baseline is not None:  # baseline first, the other arms after it in directory order
        summaries = [baseline] + [s for s in summaries if s is not baseline]

    ordered = {s.name: scalars[s.name] for s in summaries}  # baseline first, as in the table
    written = plotting.plot_compare(ordered, logdir / "plots", gap=gap or None) if plots else []
    parts = [f"# bigexp report: {logdir}", "",
             f"Read from the TensorBoard event files. Unfinished runs are fine: not yet logged = {DASH}.", "",
             "## Arms", "", arms_table(summaries), ""]
    if baseline is not None and len(summaries) > 1:
        parts += [f"## Differences (run minus {baseline.name})", "", differences_table(summaries, baseline), ""]
    if gap:
        parts += ["## Equivalence gap on the probe batch", "",
                  "Baseline vs twin, same seed and data order (see `gap/*` in TensorBoard).", "", gap_table(gap), ""]
    if written:
        parts += ["## Plots", ""] + [f"![{p.stem}](plots/{p.name})" for p in written] + [""]
    text = "\n".join(parts)
    report_path = logdir / "report.md"
    write_text_atomic(report_path, text)
    return ReportResult(logdir=logdir, report_path=report_path, plots=written, summaries=summaries,
                        baseline=baseline, gap=gap, text=text)


# ---------------------------------------------------------------------------------------------- CLI
def add_arguments(parser) -> None:
    parser.add_argument("logdir", help="a `bigexp compare` logdir (<out_dir>/<name>) or one run directory")
    parser.add_argument("--no-plots", action="store_true", help="only the markdown table")


def run(args) -> int:
    try:
        res = build_report(args.logdir, plots=not args.no_plots)
    except FileNotFoundError as e:
        print(f"bigexp report: {e}", file=sys.stderr)
        return 2
    print(res.text.split("## Plots")[0].rstrip())
    print(f"\nreport: {res.report_path}")
    for p in res.plots:
        print(f"plot:   {p}")
    return 0
