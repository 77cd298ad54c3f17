"""`bigexp report <logdir>`: a markdown table and PNG plots, read back from the TensorBoard EVENT FILES.

Works on a compare logdir (<logdir>/<arm>/ runs side by side, optional <logdir>/gap/) or on one run directory,
finished or not: anything not logged yet (no validation so far, no img/s) shows as "—". Writes
<logdir>/report.md and <logdir>/plots/*.png, and prints the table.

Numbers per arm: final and best val top-1/top-5 (percent), final val loss, final train loss (mean over the last
logging window), wall time (last minus first event wall_time, seconds, all scalar events of the run), median
train img/s, steps, the largest weight norm of the scale-invariant groups. Differences are arm minus baseline
(the sgd arm when there is one).

Several seeds (<logdir>/<arm>/seed<s>/, compare.seeds): per arm the mean ± sd over seeds of final and best top-1,
and each arm minus the baseline paired by seed with a 95 % t interval and a verdict (bigexp.analysis.seeds); the
plots draw mean lines with mean ± sd bands. The control arm (compare.control): its gap to the baseline beside the
twin's, and per gap metric whether the twin departs faster than that float noise (bigexp.analysis.departure).

The event files are read by bigexp.analysis.events, the PNGs drawn by bigexp.analysis.plots from the scalars read
here; `plot_run` is the one-run version the training loop calls. The command line is bigexp.analysis.cli.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional

import yaml

from bigexp.analysis.departure import departure_table
from bigexp.analysis.events import (BASELINE_ARM, CONTROL_ARM, GAP_CONTROL_RUN, GAP_RUN, has_event_files,
                                    load_scalar_events, load_scalars, seed_dirs, seed_run, split_seed_run)
from bigexp.analysis.markdown import markdown_table
from bigexp.analysis.plots import plot_compare, plot_compare_seeds
from bigexp.analysis.seeds import seeds_section
from bigexp.atomic import write_text_atomic
from bigexp.run import metrics as M

DASH = "—"


# ---------------------------------------------------------------------------------------------- runs
def find_runs(logdir: Path | str) -> dict:
    """name -> run directory: every direct subdirectory with event files (the arms, the gap runs) and every seed
    subdirectory of one (<arm>/seed<s>); the logdir itself when it holds scalars (a single run). A logdir root that only holds the custom-scalars layout is not a run."""
    logdir = Path(logdir)
    if not logdir.is_dir():
        raise FileNotFoundError(f"{logdir}: no such directory")
    runs = {}
    if load_scalars(logdir):
        runs[logdir.name or str(logdir)] = logdir
    for d in sorted(logdir.iterdir()):
        if d.is_dir() and not d.name.startswith("."):
            if has_event_files(d):
                runs[d.name] = d
            for seed, sd in seed_dirs(d).items():   # compare.seeds: <arm>/seed<s>, named "<arm>/seed<s>"
                runs[seed_run(d.name, seed)] = sd
    return runs


def run_arm(run_dir: Path) -> Optional[str]:
    """The arm (optim.optimizer) of a run, from the resolved config.yaml train() writes beside the events."""
    cfg = Path(run_dir) / "config.yaml"
    if not cfg.is_file():
        return None
    try:
        data = yaml.safe_load(cfg.read_text()) or {}
        return (data.get("optim") or {}).get("optimizer")
    except Exception:  # unreadable or not ours: the run is still reported, named by its directory
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
    s.final_top1, s.best_top1 = _last(sc, M.VAL_TOP1), _best(sc, M.VAL_TOP1)
    s.final_top5, s.best_top5 = _last(sc, M.VAL_TOP5), _best(sc, M.VAL_TOP5)
    s.final_val_loss = _last(sc, M.VAL_LOSS)
    s.final_train_loss = _last(sc, M.TRAIN_LOSS)
    walls = [w for _, _, ws in events.values() for w in ws]
    if walls:
        s.wall_time_s = max(walls) - min(walls)
    ips = sc.get(M.TRAIN_IMG_PER_S)
    if ips and ips[1]:
        s.median_img_per_s = statistics.median(ips[1])
    steps = [st for t, (sts, _) in sc.items() if not t.startswith(M.HPARAM_PREFIX) for st in sts]
    if steps:
        s.steps = max(steps)
    norms = [max(v) for t, (_, v) in sc.items()
             if v and (g := M.split_opt_tag(t)) and g[1] == M.WEIGHT_NORM and g[0].startswith("scale_invariant")]
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


def arms_table(summaries: list) -> str:
    headers = ["run", "arm"] + [h for _, h, _ in COLUMNS]
    rows = [[s.name, s.arm or DASH] + [_fmt(getattr(s, a), f) for a, _, f in COLUMNS] for s in summaries]
    return markdown_table(headers, rows)


def pick_baseline(summaries: list) -> Optional[ArmSummary]:
    """The run named BASELINE_ARM (its first seed), else the first sgd run that is not the control, else the
    first run."""
    for s in summaries:
        if split_seed_run(s.name)[0] == BASELINE_ARM:
            return s
    for s in summaries:
        if s.arm == BASELINE_ARM and split_seed_run(s.name)[0] != CONTROL_ARM:
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


GAP_COLUMNS = ((M.GAP_MAX_ABS_LOGIT, "max abs Δlogit"), (M.GAP_REL_MAX_ABS_LOGIT, "rel. max Δlogit"),
               (M.GAP_KL, "KL (nats)"), (M.GAP_TOP1_AGREEMENT, "top-1 agreement"),
               (M.GAP_MIN_LAYER_COSINE, "min layer cos"), (M.GAP_MAX_DIRECTION_GAP, "max direction gap"))


def gap_table(gap: Mapping) -> str:
    """Rows: the first probe, the last probe and the worst value over training, per gap metric."""
    cols = [(t, h) for t, h in GAP_COLUMNS if t in gap and gap[t][1]]
    if not cols:
        return ""
    worse_is_low = {M.GAP_TOP1_AGREEMENT, M.GAP_MIN_LAYER_COSINE}
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
    gap: dict = field(default_factory=dict)     # twin vs baseline (single seed; with seeds: the first seed's)
    text: str = ""
    gaps: dict = field(default_factory=dict)    # gap run name (gap, gap_control, gap/seed<s>, ...) -> scalars


def _pop_gap_runs(runs: dict) -> dict:
    """Take the gap runs (twin and control, per seed) out of `runs`: {name: scalars}."""
    names = [n for n in runs if split_seed_run(n)[0] in (GAP_RUN, GAP_CONTROL_RUN)]
    return {n: {t: (v[0], v[1]) for t, v in load_scalar_events(runs.pop(n)).items()} for n in names}


def _gap_parts(gaps: dict) -> list:
    """The report's gap sections: per seed the twin's gap table, the control's, and whether the twin departs
    faster than the control (float noise)."""
    seeds = sorted({split_seed_run(n)[1] for n in gaps}, key=lambda s: -1 if s is None else s)
    parts, departure_input = [], {}
    for seed in seeds:
        twin, control = gaps.get(seed_run(GAP_RUN, seed)), gaps.get(seed_run(GAP_CONTROL_RUN, seed))
        where = "" if seed is None else f" (seed {seed})"
        if twin:
            parts += [f"### Baseline vs twin{where}", "", gap_table(twin), ""]
        if control:
            parts += [f"### Baseline vs control ({CONTROL_ARM}: float noise only){where}", "", gap_table(control), ""]
        if twin and control:
            departure_input[seed] = (twin, control)
    if departure_input:
        parts += ["### Twin vs float noise", "", departure_table(departure_input), ""]
    if parts:
        parts = ["## Equivalence gap on the probe batch", "",
                 "Baseline vs twin, same seed and data order (see `gap/*` in TensorBoard); with compare.control "
                 "also baseline vs the baseline from nudged weights (run `gap_control`).", ""] + parts
    return parts


def _by_arm(items: dict) -> dict:
    """arm -> seed -> item for the runs named <arm>/seed<s> ({} when no run has a seed)."""
    out: dict = {}
    for name, item in items.items():
        arm, seed = split_seed_run(name)
        if seed is not None:
            out.setdefault(arm, {})[seed] = item
    return out


def _plots(logdir: Path, ordered: dict, gaps: dict) -> list:
    """plots/*.png: arms overlaid (and their seeds as mean ± sd bands), the gap(s)."""
    by_arm = _by_arm(ordered)
    if by_arm:
        labelled = {label: [g for n, g in sorted(gaps.items()) if split_seed_run(n)[0] == run]
                    for run, label in ((GAP_RUN, "twin vs baseline"),
                                       (GAP_CONTROL_RUN, "control vs baseline (float noise)"))}
        return plot_compare_seeds({a: list(per.values()) for a, per in by_arm.items()}, logdir / "plots",
                                  gaps={k: v for k, v in labelled.items() if v})
    return plot_compare(ordered, logdir / "plots", gap=gaps.get(GAP_RUN) or None,
                        control_gap=gaps.get(GAP_CONTROL_RUN) or None)


def build_report(logdir: Path | str, *, plots: bool = True) -> ReportResult:
    """Read every run under `logdir`, write report.md (and plots/*.png), return what was found.

    FileNotFoundError when there is nothing to report; InputFileError (naming it) for a corrupt event file."""
    logdir = Path(logdir)
    runs = find_runs(logdir)
    gaps = _pop_gap_runs(runs)
    # Runs whose event files hold no scalars (e.g. a comparison's layout-only root inside a parent dir) are skipped.
    events = {name: ev for name, ev in ((n, load_scalar_events(d)) for n, d in runs.items()) if ev}
    if not events and not any(gaps.values()):
        raise FileNotFoundError(f"{logdir}: no TensorBoard event files with scalars here or in its subdirectories")
    summaries, scalars = [], {}
    for name, ev in events.items():
        scalars[name] = {t: (v[0], v[1]) for t, v in ev.items()}
        summaries.append(summarize_run(name, ev, run_arm(runs[name])))
    baseline = pick_baseline(summaries)
    if baseline is not None:  # baseline first, the other arms after it in directory order, each arm's seeds together
        base_arm = split_seed_run(baseline.name)[0]
        arm_order = {a: i for i, a in enumerate(dict.fromkeys(
            [base_arm] + [split_seed_run(s.name)[0] for s in summaries if s is not baseline]))}
        summaries.sort(key=lambda s: (s is not baseline, arm_order[split_seed_run(s.name)[0]],
                                      split_seed_run(s.name)[1] or 0))

    ordered = {s.name: scalars[s.name] for s in summaries}  # baseline first, as in the table
    written = _plots(logdir, ordered, gaps) if plots else []
    parts = [f"# bigexp report: {logdir}", "",
             f"Read from the TensorBoard event files. Unfinished runs are fine: not yet logged = {DASH}.", "",
             "## Arms", "", arms_table(summaries), ""]
    by_arm = _by_arm({s.name: s for s in summaries})
    if by_arm and baseline is not None:
        parts += ["## Seeds", "", seeds_section(by_arm, split_seed_run(baseline.name)[0]), ""]
    elif baseline is not None and len(summaries) > 1:
        parts += [f"## Differences (run minus {baseline.name})", "", differences_table(summaries, baseline), ""]
    parts += _gap_parts(gaps)
    if written:
        parts += ["## Plots", ""] + [f"![{p.stem}](plots/{p.name})" for p in written] + [""]
    text = "\n".join(parts)
    report_path = logdir / "report.md"
    write_text_atomic(report_path, text)
    twin_gaps = sorted((-1 if seed is None else seed, n) for n in gaps
                       for run, seed in [split_seed_run(n)] if run == GAP_RUN)
    first_gap = gaps[twin_gaps[0][1]] if twin_gaps else {}
    return ReportResult(logdir=logdir, report_path=report_path, plots=written, summaries=summaries,
                        baseline=baseline, gap=first_gap, text=text, gaps=gaps)


def plot_run(run_dir: Path | str) -> list[Path]:
    """One run's curves from its event files -> <run_dir>/plots/*.png (bigexp.run.loop.train calls this at the end
    of a run when log.plots is true). Returns the written paths; [] when the run has no scalars yet."""
    run_dir = Path(run_dir)
    scalars = load_scalars(run_dir)
    if not scalars:
        return []
    return plot_compare({run_dir.name: scalars}, run_dir / "plots")
