"""`bigexp compare`'s sequential modes: the arms trained by the real loop (bigexp.run.loop.train), one after the other.

    compare(cfg)                 every arm of compare.arms in this process (same seed, same data order), and the
                                 control arm sgd_perturbed when compare.control; for each seed of compare.seeds
    compare(cfg, arm=NAME)       one arm only (seed=S: of one seed only), into the same layout (SLURM: one job per
                                 arm); the gap and layout are (re)written when the other arm's probes are there
    compare(cfg, layout_only=True)   no training: (re)write the layout, the gap runs (from the probe files), the report

Each arm logs through CompareLogger and records its probes through train()'s step_hook (probes.ProbeRecorder; the
control arm nudges its weights first, bigexp.analysis.control); the logdir layout is described in
bigexp.analysis.events. `bigexp compare --lockstep` is bigexp.analysis.lockstep.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from bigexp.analysis.control import PerturbAtStart, check_control
from bigexp.analysis.events import (BASELINE_ARM, CONTROL_ARM, GAP_CONTROL_RUN, GAP_RUN, CompareLogger,
                                    baseline_and_twin, seed_run, write_gap_run, write_layout)
from bigexp.analysis.probes import ProbeRecorder, compute_gap, probe_batch
from bigexp.analysis.report import build_report
from bigexp.analysis.seeds import seeds_layout
from bigexp.config import arm_config
from bigexp.config.schema import Config
from bigexp.errors import ConfigError
from bigexp.run.distributed import init_distributed
from bigexp.run.lock import hold_run_lock
from bigexp.run.loop import train


@dataclass
class CompareResult:
    logdir: Path
    arm_dirs: dict                       # run (arm, or <arm>/seed<s>) -> run directory
    results: dict = field(default_factory=dict)   # run -> TrainResult (trained in this call), or val dict
    gap: list = field(default_factory=list)       # [{"step", "gap/..."}] twin vs baseline (the last seed's)
    layout_path: Optional[Path] = None
    report: object = None                # bigexp.analysis.report.ReportResult
    gaps: dict = field(default_factory=dict)      # gap run (gap, gap_control, gap/seed<s>, ...) -> rows


def arm_names(cfg: Config) -> list:
    """compare.arms, checked: at least one arm, each at most once."""
    arms = list(cfg.compare.arms)
    if not arms:
        raise ConfigError("compare.arms is empty: name at least one of sgd, expsgd")
    if len(set(arms)) != len(arms):
        raise ConfigError(f"compare.arms = {arms}: each arm at most once (they share the run directory name)")
    return arms


def run_arms(cfg: Config) -> list:
    """The arms to train: compare.arms, then the control arm when compare.control (it needs the baseline)."""
    arms = arm_names(cfg)
    if not cfg.compare.control:
        return arms
    check_control(cfg)
    if BASELINE_ARM not in arms:
        raise ConfigError(f"compare.control: the control is the {BASELINE_ARM} baseline nudged; compare.arms = "
                          f"{arms} has no {BASELINE_ARM}")
    return arms + [CONTROL_ARM]


def seed_layout(cfg: Config) -> list:
    """[None] for the single-seed layout (compare.seeds empty or one seed), else the seeds, checked."""
    return seeds_layout(cfg.compare.seeds)


def seeded(cfg: Config, seed: Optional[int]) -> Config:
    """cfg with run.seed = seed (None: the one seed of compare.seeds if given, else run.seed as it is)."""
    out = copy.deepcopy(cfg)
    if seed is not None:
        out.run.seed = seed
    elif cfg.compare.seeds:
        out.run.seed = cfg.compare.seeds[0]
    return out


def logdir_of(cfg: Config) -> Path:
    return Path(cfg.run.out_dir) / cfg.run.name


def arm_cfg_for(cfg: Config, arm: str, *, world_size: Optional[int] = None, seed: Optional[int] = None) -> Config:
    """The arm's config: optim.optimizer = arm (the baseline's for the control arm), run.seed per `seeded`, run
    directory <out_dir>/<name>/<arm> (or .../<arm>/seed<s>)."""
    acfg = arm_config(seeded(cfg, seed), BASELINE_ARM if arm == CONTROL_ARM else arm, world_size=world_size)
    run_dir = logdir_of(cfg) / seed_run(arm, seed)
    acfg.run.out_dir, acfg.run.name = str(run_dir.parent), run_dir.name
    return acfg


def finish(cfg: Config, arms: list, result: CompareResult, *, write_gap: bool, report: bool) -> None:
    """The custom-scalars layout, the gap runs of every seed (from the arms' probe files, when write_gap: twin vs
    baseline, and control vs baseline when the control ran) and the report."""
    logdir = result.logdir
    logdir.mkdir(parents=True, exist_ok=True)
    result.layout_path = write_layout(logdir, cfg.run.name)
    base, twin = baseline_and_twin([a for a in arms if a != CONTROL_ARM])
    others = [(GAP_RUN, twin)] + ([(GAP_CONTROL_RUN, CONTROL_ARM)] if CONTROL_ARM in arms else [])
    for seed in seed_layout(cfg) if write_gap else []:
        for gap_run, other in others:
            if other is None:
                continue
            rows = compute_gap(logdir / seed_run(base, seed), logdir / seed_run(other, seed))
            result.gaps[seed_run(gap_run, seed)] = rows
            write_gap_run(logdir, rows, run=seed_run(gap_run, seed))
            if gap_run == GAP_RUN:
                result.gap = rows
    if report:
        try:
            result.report = build_report(logdir)
        except FileNotFoundError:  # nothing logged yet (an arm job that stopped before its first scalar)
            result.report = None


def compare(cfg: Config, *, arm: Optional[str] = None, seed: Optional[int] = None, layout_only: bool = False,
            ctx=None, report: bool = True, finish_layout: bool = True) -> CompareResult:
    """Run the arms (and the control) one after the other, for each seed of compare.seeds (or only `arm`, only
    `seed`), same seed and data order within a seed, into one logdir; then (finish_layout) the gap runs, the
    custom-scalars layout and the report. layout_only: no training."""
    arms = run_arms(cfg)
    seeds = seed_layout(cfg)
    if arm is not None and arm not in arms:
        raise ConfigError(f"--arm {arm}: not one of compare.arms = {arms}")
    if seed is not None and seed not in seeds:
        raise ConfigError(f"--seed {seed}: not one of compare.seeds = {cfg.compare.seeds} (with one seed or none, "
                          f"leave --seed out)")
    logdir = logdir_of(cfg)
    result = CompareResult(logdir=logdir, arm_dirs={seed_run(a, s): logdir / seed_run(a, s)
                                                    for s in seeds for a in arms})
    if layout_only:
        finish(cfg, arms, result, write_gap=True, report=report)
        return result

    ctx = ctx or init_distributed(cfg.run.device)
    x = probe_batch(seeded(cfg, None)) if ctx.is_main else None  # the val order is fixed: one batch for every seed
    for s in [seed] if seed is not None else seeds:
        for a in [arm] if arm is not None else arms:
            _train_arm(cfg, a, s, x, ctx, result)
    if ctx.is_main and finish_layout:
        finish(cfg, arms, result, write_gap=True, report=report)
    ctx.barrier()
    return result


def _train_arm(cfg: Config, arm: str, seed: Optional[int], x, ctx, result: CompareResult) -> None:
    acfg = arm_cfg_for(cfg, arm, world_size=ctx.world_size, seed=seed)
    name = seed_run(arm, seed)
    run_dir = result.logdir / name
    # The run-directory lock before the event writer opens a file there (train() takes it again: it is re-entrant
    # for its holder), so a compare refused for a live holder leaves the arm's directory as it was.
    lock = hold_run_lock(run_dir, ctx)
    logger = CompareLogger(run_dir, enabled=acfg.log.tensorboard and ctx.is_main)
    hook = ProbeRecorder(x, run_dir, cfg.compare.probe_every_steps, enabled=ctx.is_main)
    if arm == CONTROL_ARM:
        hook = PerturbAtStart(then=hook)  # every rank nudges (the same z), only rank 0 records
    try:
        result.results[name] = train(acfg, ctx=ctx, logger=logger, step_hook=hook)  # plots too (log.plots)
    finally:
        logger.close()
        lock.release()
