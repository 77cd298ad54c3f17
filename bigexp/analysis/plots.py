"""PNG plots of training curves (matplotlib, Agg backend: no display needed, safe on compute nodes).

Input everywhere is data, never a file: the `Scalars` mapping tag -> (steps, values), sorted by step, that
`bigexp.analysis.events.load_scalars` reads from TensorBoard event files. Every figure is written atomically (temp
file in the same directory, fsync, os.replace), so a plot being rewritten at the end of a run never leaves a
half-written PNG.

    plot_compare(runs, out_dir, gap=...)   arms overlaid + gap (and the control's gap)  -> <out_dir>/*.png
    plot_compare_seeds(arms, out_dir, gaps=...)   the same over several seeds: mean lines, mean ± sd bands
    plot_curves / plot_bands / plot_gap / plot_gap_bands   one figure each
    plot_theory(arms, path)   per invariant group: measured angular update of every arm beside its prediction
(One run's plots from its event files: bigexp.analysis.report.plot_run.)
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping, Sequence

from bigexp.analysis.seeds import band
from bigexp.atomic import atomic_open
from bigexp.run import metrics as M

# Train and val loss share one figure; their lines are labelled "<run>: train" / "<run>: val".
LOSS_PATTERN = f"^(?:{re.escape(M.TRAIN_LOSS)}|{re.escape(M.VAL_LOSS)})$"
# What is plotted, in order: (file stem, title, y label, tag regex, log y). The regex's first group (if any) is
# the param group, so several groups of one run get one line each.
CURVES = (
    ("val_top1", "validation top-1", "top-1 (%)", M.tag_regex(M.VAL_TOP1), False),
    ("train_loss", "training loss (solid) and validation loss (dashed)", "cross-entropy (nats)", LOSS_PATTERN, False),
    ("lr", "applied learning rate per param group (log y)", "LR", M.opt_tag_regex(M.APPLIED_LR), True),
    ("effective_lr", "effective LR = LR / ‖w‖² per param group (log y)", "LR / ‖w‖²",
     M.opt_tag_regex(M.EFFECTIVE_LR), True),
    ("weight_norm", "weight norm ‖w‖ per param group (log y)", "‖w‖", M.opt_tag_regex(M.WEIGHT_NORM), True),
)
# Gap curves: (tag, y label, log y). Exact zeros (step 0) cannot sit on a log axis; they are drawn at GAP_FLOOR.
GAP_CURVES = (
    (M.GAP_MAX_ABS_LOGIT, "max |Δ logit|", True),
    (M.GAP_KL, "KL(p_base || p_twin) (nats)", True),
    (M.GAP_TOP1_AGREEMENT, "top-1 agreement", False),
    (M.GAP_MAX_DIRECTION_GAP, "max layer ‖u_a − u_b‖, u = w/‖w‖", True),
    (M.GAP_MIN_LAYER_COSINE, "min layer cosine", False),
)
GAP_FLOOR = 1e-17

Series = tuple  # (steps: list[int], values: list[float])
Scalars = Mapping[str, Series]


def _pyplot():
    # matplotlib is imported on first use, not with this module: a training process imports the analysis package
    # (plot_run at the end of a run) and should not pay ~1 s for a plot it may never draw (log.plots false).
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_figure_atomic(fig, path: Path) -> Path:
    """savefig to a temp file beside `path`, fsync, then os.replace: readers see the old or the new PNG."""
    path = Path(path)
    with atomic_open(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=110, bbox_inches="tight")
    return path


def _matching(scalars: Scalars, pattern: str) -> list[tuple[str, str, Series]]:
    """(tag, group label, series) for every tag matching `pattern`, sorted by tag."""
    out = []
    rx = re.compile(pattern)
    for tag in sorted(scalars):
        m = rx.match(tag)
        if m and len(scalars[tag][0]) > 0:
            out.append((tag, m.group(1) if m.groups() else "", scalars[tag]))
    return out


def _positive(values: Sequence[float], floor: float | None) -> list[float]:
    if floor is None:
        return [v if v > 0 else float("nan") for v in values]
    return [max(v, floor) for v in values]


def plot_curves(runs: Mapping[str, Scalars], path: Path, *, title: str, ylabel: str, pattern: str,
                logy: bool = False, floor: float | None = None) -> Path | None:
    """One figure: every run's tags matching `pattern` (one line per run and param group). None if nothing
    matched (no PNG written)."""
    lines = []
    for run, scalars in runs.items():
        for tag, group, (steps, values) in _matching(scalars, pattern):
            label = run if not group else f"{run}: {group}"
            if pattern == LOSS_PATTERN:
                label = f"{run}: {tag.partition('/')[0]}"  # train / val
            lines.append((label, tag, steps, values))
    if not lines:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 4.2))
    try:
        for i, (label, tag, steps, values) in enumerate(lines):
            ys = _positive(values, floor) if logy else list(values)
            style = "--" if tag == M.VAL_LOSS else "-"
            marker = "o" if len(steps) <= 30 else None
            ax.plot(steps, ys, style, marker=marker, markersize=3, label=label)
        return _finish_axes(fig, ax, path, title=title, ylabel=ylabel, logy=logy)
    finally:
        plt.close(fig)


def plot_gap(gap: Scalars, path: Path, control: Scalars | None = None) -> Path | None:
    """The equivalence gap over training, one panel per metric; with `control` (the chaos-floor control's gap to
    the baseline) both overlaid. None when the gap run has no scalars."""
    labelled = {"twin vs baseline": [gap]}
    if control:
        labelled["control vs baseline (float noise)"] = [control]
    return plot_gap_bands(labelled, path)


def plot_gap_bands(labelled: Mapping[str, Sequence[Scalars]], path: Path) -> Path | None:
    """Gap panels with one line per label: the mean over its gap runs (one per seed) and a mean ± sd band when
    there are several. None when no label has a gap scalar."""
    panels = [(tag, label, logy) for tag, label, logy in GAP_CURVES
              if any(tag in g and len(g[tag][0]) > 0 for runs in labelled.values() for g in runs)]
    if not panels:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(len(panels), 1, figsize=(7.0, 2.2 * len(panels)), sharex=True, squeeze=False)
    try:
        for ax, (tag, label, logy) in zip(axes[:, 0], panels):
            for name, runs in labelled.items():
                series = [g[tag] for g in runs if tag in g and len(g[tag][0]) > 0]
                if series:
                    _draw_band(ax, name, band(series), len(series), floor=GAP_FLOOR if logy else None)
            if logy:
                ax.set_yscale("log")
            ax.set_ylabel(label, fontsize=8)
            ax.grid(True, which="both", alpha=0.3)
            if len(labelled) > 1:
                ax.legend(fontsize=6, loc="best")
        axes[0, 0].set_title(f"equivalence gap between the arms on the probe batch (exact 0 drawn at {GAP_FLOOR:g})")
        axes[-1, 0].set_xlabel("optimizer step")
        return save_figure_atomic(fig, path)
    finally:
        plt.close(fig)


def _draw_band(ax, label: str, stats: tuple, n: int, *, floor: float | None, style: str = "-") -> None:
    """The mean line, and (for n > 1 series) the mean ± sd band, clipped at `floor` on a log axis."""
    steps, means, sds = stats
    ys = _positive(means, floor) if floor is not None else list(means)
    line, = ax.plot(steps, ys, style, marker="o" if len(steps) <= 50 else None, markersize=3,
                    label=label if n <= 1 else f"{label} (mean ± sd, {n} seeds)")
    if n > 1:
        lo = [m - s for m, s in zip(means, sds)]
        hi = [m + s for m, s in zip(means, sds)]
        if floor is not None:
            lo, hi = _positive(lo, floor), _positive(hi, floor)
        ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)


def plot_bands(arms: Mapping[str, Sequence[Scalars]], path: Path, *, title: str, ylabel: str, pattern: str,
               logy: bool = False) -> Path | None:
    """One figure: per arm (and param group) the mean over its seeds' runs of the tags matching `pattern`, with a
    mean ± sd band. None if nothing matched."""
    lines = {}   # (arm, label part, tag) -> [series per seed]
    for arm, seeds in arms.items():
        for scalars in seeds:
            for tag, group, series in _matching(scalars, pattern):
                part = tag.partition("/")[0] if pattern == LOSS_PATTERN else group
                lines.setdefault((arm, part, tag), []).append(series)
    if not lines:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 4.2))
    try:
        for (arm, part, tag), series in lines.items():
            _draw_band(ax, f"{arm}: {part}" if part else arm, band(series), len(series),
                       floor=GAP_FLOOR if logy else None, style="--" if tag == M.VAL_LOSS else "-")
        return _finish_axes(fig, ax, path, title=title, ylabel=ylabel, logy=logy)
    finally:
        plt.close(fig)


def plot_theory(arms: Mapping[str, Sequence[Scalars]], path: Path) -> Path | None:
    """theory.png: one panel per invariant group, the angular update Delta_t of every arm (mean ± sd band over its
    seeds when it has several) and the equilibrium prediction sqrt(2*eta*lambda/(1+gamma)) (the baseline's, the
    first arm: both arms log the same one), log y. None when no run logged the theory."""
    rx = re.compile(M.theory_tag_regex(M.ANGULAR_UPDATE))
    groups = sorted({m.group(1) for seeds in arms.values() for sc in seeds for t in sc for m in [rx.match(t)] if m})
    if not groups:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(len(groups), 1, figsize=(7.0, 3.2 * len(groups)), sharex=True, squeeze=False)
    try:
        for ax, group in zip(axes[:, 0], groups):
            measured, pred = M.theory_tag(group, M.ANGULAR_UPDATE), M.theory_tag(group, M.ANGULAR_EQUILIBRIUM)
            for arm, seeds in arms.items():
                series = [sc[measured] for sc in seeds if measured in sc and len(sc[measured][0]) > 0]
                if series:
                    _draw_band(ax, f"{arm}: measured Δ_t", band(series), len(series), floor=GAP_FLOOR)
            first = next((sc[pred] for seeds in arms.values() for sc in seeds if pred in sc), None)
            if first is not None:
                ax.plot(first[0], _positive(first[1], None), "k--", label="prediction sqrt(2ηλ/(1+γ))")
            ax.set_yscale("log")
            ax.set_ylabel(f"{group}: angle (rad)", fontsize=8)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7, loc="best")
        axes[0, 0].set_title("angular update per step Δ_t = ∠(w_t, w_{t+1}) vs spherical-motion equilibrium")
        axes[-1, 0].set_xlabel("optimizer step")
        return save_figure_atomic(fig, path)
    finally:
        plt.close(fig)


def plot_compare(runs: Mapping[str, Scalars], out_dir: Path, gap: Scalars | None = None,
                 control_gap: Scalars | None = None) -> list[Path]:
    """The standard curves with all `runs` overlaid, plus gap.png when `gap` has scalars (the control's gap
    overlaid when given). Returns written paths."""
    out_dir = Path(out_dir)
    written = []
    for stem, title, ylabel, pattern, logy in CURVES:
        p = plot_curves(runs, out_dir / f"{stem}.png", title=title, ylabel=ylabel, pattern=pattern, logy=logy)
        if p is not None:
            written.append(p)
    p = plot_theory({run: [scalars] for run, scalars in runs.items()}, out_dir / "theory.png")
    if p is not None:
        written.append(p)
    if gap:
        p = plot_gap(gap, out_dir / "gap.png", control=control_gap)
        if p is not None:
            written.append(p)
    return written


def plot_compare_seeds(arms: Mapping[str, Sequence[Scalars]], out_dir: Path,
                       gaps: Mapping[str, Sequence[Scalars]] | None = None) -> list[Path]:
    """plot_compare for several seeds: arm -> one Scalars per seed, each curve the mean with a mean ± sd band;
    gaps: label (twin vs baseline, control vs baseline) -> one gap Scalars per seed."""
    out_dir = Path(out_dir)
    written = []
    for stem, title, ylabel, pattern, logy in CURVES:
        p = plot_bands(arms, out_dir / f"{stem}.png", title=title + " — mean ± sd over seeds", ylabel=ylabel,
                       pattern=pattern, logy=logy)
        if p is not None:
            written.append(p)
    p = plot_theory(arms, out_dir / "theory.png")
    if p is not None:
        written.append(p)
    if gaps:
        p = plot_gap_bands(gaps, out_dir / "gap.png")
        if p is not None:
            written.append(p)
    return written


def _finish_axes(fig, ax, path: Path, *, title: str, ylabel: str, logy: bool) -> Path | None:
    """Axis labels, grid and legend every step-indexed chart shares, then the atomic PNG write."""
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return save_figure_atomic(fig, path)
