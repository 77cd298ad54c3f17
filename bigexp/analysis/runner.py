"""`bigexp compare`'s sequential modes: the arms trained by the real loop (bigexp.run.loop.train), one after the other.

    compare(cfg)                 every arm of compare.arms in this process (same seed, same data order)
    compare(cfg, arm=NAME)       one arm only, into the same layout (SLURM: one job per arm); the gap and layout
                                 are (re)written when the other arm's probes are there
    compare(cfg, layout_only=True)   no training: (re)write the layout, the gap run (from the probe files), the report

Each arm logs through CompareLogger and records its probes through train()'s step_hook (probes.ProbeRecorder);
the logdir layout is described in bigexp.analysis.events. `bigexp compare --lockstep` is bigexp.analysis.lockstep.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from bigexp.analysis.events import CompareLogger, baseline_and_twin, write_gap_run, write_layout
from bigexp.analysis.probes import ProbeRecorder, compute_gap, probe_batch
from bigexp.analysis.report import build_report
from bigexp.config import arm_config
from bigexp.config.schema import Config
from bigexp.errors import ConfigError
from bigexp.run.distributed import init_distributed
from bigexp.run.loop import train


@dataclass
class CompareResult:
    logdir: Path
    arm_dirs: dict                       # arm -> run directory
    results: dict = field(default_factory=dict)   # arm -> TrainResult (sgd/expsgd trained in this call), or val dict
    gap: list = field(default_factory=list)       # [{"step", "gap/..."}]
    layout_path: Optional[Path] = None
    report: object = None                # bigexp.analysis.report.ReportResult


def arm_names(cfg: Config) -> list:
    """compare.arms, checked: at least one arm, each at most once."""
    arms = list(cfg.compare.arms)
    if not arms:
        raise ConfigError("compare.arms is empty: name at least one of sgd, expsgd")
    if len(set(arms)) != len(arms):
        raise ConfigError(f"compare.arms = {arms}: each arm at most once (they share the run directory name)")
    return arms


def logdir_of(cfg: Config) -> Path:
    return Path(cfg.run.out_dir) / cfg.run.name


def arm_cfg_for(cfg: Config, arm: str, *, world_size: Optional[int] = None) -> Config:
    """The arm's config: optim.optimizer = arm, run directory <out_dir>/<name>/<arm>."""
    acfg = arm_config(cfg, arm, world_size=world_size)
    acfg.run.out_dir = str(logdir_of(cfg))
    acfg.run.name = arm
    return acfg


def finish(cfg: Config, arms: list, result: CompareResult, *, write_gap: bool, report: bool) -> None:
    """The custom-scalars layout, the gap run (from both arms' probe files, when write_gap) and the report."""
    logdir = result.logdir
    logdir.mkdir(parents=True, exist_ok=True)
    result.layout_path = write_layout(logdir, cfg.run.name)
    base, twin = baseline_and_twin(arms)
    if write_gap and twin is not None:
        result.gap = compute_gap(logdir / base, logdir / twin)
        write_gap_run(logdir, result.gap)
    if report:
        try:
            result.report = build_report(logdir)
        except FileNotFoundError:  # nothing logged yet (an arm job that stopped before its first scalar)
            result.report = None


def compare(cfg: Config, *, arm: Optional[str] = None, layout_only: bool = False, ctx=None,
            report: bool = True) -> CompareResult:
    """Run the arms of cfg.compare.arms one after the other (or only `arm`), same seed and data order, into one
    logdir; then the gap run, the custom-scalars layout and the report. layout_only: no training."""
    arms = arm_names(cfg)
    if arm is not None and arm not in arms:
        raise ConfigError(f"--arm {arm}: not one of compare.arms = {arms}")
    logdir = logdir_of(cfg)
    result = CompareResult(logdir=logdir, arm_dirs={a: logdir / a for a in arms})
    if layout_only:
        finish(cfg, arms, result, write_gap=True, report=report)
        return result

    ctx = ctx or init_distributed(cfg.run.device)
    x = probe_batch(cfg) if ctx.is_main else None
    for a in [arm] if arm is not None else arms:
        acfg = arm_cfg_for(cfg, a, world_size=ctx.world_size)
        run_dir = logdir / a
        logger = CompareLogger(run_dir, enabled=acfg.log.tensorboard and ctx.is_main)
        hook = ProbeRecorder(x, run_dir, cfg.compare.probe_every_steps, enabled=ctx.is_main)
        try:
            result.results[a] = train(acfg, ctx=ctx, logger=logger, step_hook=hook)  # plots too (log.plots)
        finally:
            logger.close()
    if ctx.is_main:
        finish(cfg, arms, result, write_gap=True, report=report)
    ctx.barrier()
    return result
