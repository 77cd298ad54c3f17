"""`bigexp compare --lockstep [--float64]`: both arms stepped together in ONE plain PyTorch loop (no DeepSpeed, one
process, CPU), on the very same batches, the gap measured live every compare.probe_every_steps (and at step 0 and
the last step). --float64 runs models and inputs in double precision, so the gap shows what is left of the theorem
beyond rounding (1e-12 and below instead of float32's chaos).

`PlainArm` and `step_together` are the stepping helper this loop shares with `bigexp verify`; evaluation is the
training loop's own (bigexp.run.step.evaluate).
"""
from __future__ import annotations

import copy
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from tqdm import tqdm

from bigexp.analysis.events import GAP_RUN, CompareLogger, baseline_and_twin, write_layout
from bigexp.analysis.gap import snapshot_gap
from bigexp.analysis.probes import probe_batch, snapshot
from bigexp.analysis.report import build_report, plot_run
from bigexp.analysis.runner import CompareResult, arm_cfg_for, arm_names, logdir_of, seed_layout, seeded
from bigexp.config import save_resolved
from bigexp.config.schema import Config
from bigexp.data.loaders import build_train_loader, build_val_loader
from bigexp.data.ensure import ensure_betons
from bigexp.errors import ConfigError
from bigexp.memory_format import check_cpu_channels_last, resolve_memory_format
from bigexp.models import build_model
from bigexp.optim.build import build_optimizer, group_stats
from bigexp.optim.schedules import ParamGroupScheduler, build_schedule
from bigexp.run.angular import AngleSnapshot
from bigexp.run.distributed import DistContext, rank_threads
from bigexp.run import metrics as M
from bigexp.run.metrics import TBLogger
from bigexp.run.step import evaluate

DEVICE = "cpu"


# ---------------------------------------------------------------------------------------------- stepping helper
@dataclass
class PlainArm:
    """One model trained by a plain PyTorch loop: its optimizer and its per-step schedule."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: ParamGroupScheduler


def step_together(arms: Mapping[str, PlainArm], x: torch.Tensor, y: torch.Tensor, *,
                  label_smoothing: float = 0.0) -> dict:
    """One optimizer step of every arm on the same batch, in order: name -> (loss, seconds the step took)."""
    out = {}
    for name, arm in arms.items():
        t0 = time.perf_counter()
        loss = F.cross_entropy(arm.model(x), y, label_smoothing=label_smoothing)
        arm.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        arm.optimizer.step()
        arm.scheduler.step()
        out[name] = (loss.detach(), time.perf_counter() - t0)
    return out


class _ModelAsEngine:
    """A plain model the way run.step.evaluate reads a DeepSpeed engine: `engine.ds(x)` runs it and
    `engine.ds.module` is the model itself."""

    def __init__(self, model: torch.nn.Module):
        self.ds = self
        self.module = model

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


# ---------------------------------------------------------------------------------------------- the loop's parts
@dataclass
class _ArmState:
    plain: PlainArm
    group_names: list
    invariant: set
    logger: CompareLogger
    loss_sum: float = 0.0
    loss_n: int = 0
    seconds: float = 0.0
    imgs: int = 0
    val: dict = field(default_factory=dict)


def _build_arms(cfg: Config, arms: list, dtype: torch.dtype, fmt: torch.memory_format, spe: int,
                total: int) -> dict:
    """Every arm from one initial model (same seed, so the same weights): optimizer, schedule, logger, config."""
    logdir = logdir_of(cfg)
    torch.manual_seed(cfg.run.seed)
    base_model = build_model(cfg.model).to(dtype).to(memory_format=fmt)
    check_cpu_channels_last(base_model, DEVICE, fmt == torch.channels_last)
    res = min(cfg.data.val_res, 64)
    example = torch.randn(4, 3, res, res, dtype=dtype, generator=torch.Generator().manual_seed(cfg.run.seed))
    example = example.contiguous(memory_format=fmt)
    state = {}
    for a in arms:
        acfg = arm_cfg_for(cfg, a)
        run_dir = logdir / a
        run_dir.mkdir(parents=True, exist_ok=True)
        save_resolved(acfg, run_dir / "config.yaml")
        model = copy.deepcopy(base_model)
        built = build_optimizer(acfg, model, example)
        sched = ParamGroupScheduler(built.optimizer, build_schedule(cfg.schedule, spe, total))
        logger = CompareLogger(run_dir, enabled=cfg.log.tensorboard)
        logger.text(M.TEXT_CONFIG, (run_dir / "config.yaml").read_text())
        logger.text(M.TEXT_INVARIANCE, built.report.format())
        state[a] = _ArmState(plain=PlainArm(model, built.optimizer, sched), group_names=built.group_names,
                             invariant=set(built.report.names("invariant")), logger=logger)
    return state


class _LiveGap:
    """The gap between baseline and twin measured on the probe batch, logged to the gap run and kept as rows."""

    def __init__(self, cfg: Config, state: dict, x_probe: torch.Tensor, rows: list):
        self.base, self.twin = baseline_and_twin(list(state))
        self.state, self.x, self.rows = state, x_probe, rows
        self.logger = TBLogger(logdir_of(cfg) / GAP_RUN, enabled=cfg.log.tensorboard) if self.twin else None

    def measure(self, step: int) -> None:
        if self.twin is None:
            return
        snaps = {a: snapshot(self.state[a].plain.model, self.x, step, self.state[a].invariant)
                 for a in (self.base, self.twin)}
        row = {"step": step, **snapshot_gap(snaps[self.base], snaps[self.twin])}
        self.rows.append(row)
        self.logger.scalars(step, {k: v for k, v in row.items() if k != "step" and math.isfinite(v)})

    def close(self) -> None:
        if self.logger is not None:
            self.logger.close()


def _log_train(state: dict, step: int, epoch: int, spe: int, before: dict) -> None:
    """The logging window's train scalars of every arm, with its invariant groups' angular update over this step
    against `before` (arm -> AngleSnapshot taken just before it) beside the theory, then a fresh window."""
    for a, s in state.items():
        stats = group_stats(s.plain.optimizer, s.group_names)
        theory = before[a].measure(s.plain.optimizer) if a in before else {}
        s.logger.scalars(step, {M.TRAIN_LOSS: s.loss_sum / max(1, s.loss_n),
                                M.TRAIN_IMG_PER_S: s.imgs / max(s.seconds, 1e-9),
                                M.TRAIN_EPOCH: epoch + (step - epoch * spe) / spe, **stats, **theory})
        s.loss_sum, s.loss_n, s.seconds, s.imgs = 0.0, 0, 0.0, 0


def _evaluate_arms(state: dict, val_loader, dtype: torch.dtype, threads: int, step: int) -> None:
    one_process = DistContext()  # CPU, world size 1: evaluate's all-reduce is a no-op
    for s in state.values():
        s.val = evaluate(_ModelAsEngine(s.plain.model), val_loader, one_process, dtype)
        torch.set_num_threads(threads)  # ffcv resets torch's thread count when an epoch of its loader starts
        s.logger.scalars(step, s.val)
        s.logger.flush()


# ---------------------------------------------------------------------------------------------- lockstep
def lockstep(cfg: Config, *, float64: bool = False, report: bool = True,
             progress: Optional[bool] = None) -> CompareResult:
    """Both arms in one process and one plain PyTorch loop (no DeepSpeed), on the very same batches; the gap is
    measured in place every compare.probe_every_steps steps (and at step 0 and the last step). float64: the
    models and inputs in double precision, so the gap shows what is left of the theorem beyond rounding."""
    arms = arm_names(cfg)
    if cfg.compare.control or len(seed_layout(cfg)) > 1:
        raise ConfigError("bigexp compare --lockstep: one seed and no control arm (compare.control, several "
                          "compare.seeds): run those without --lockstep")
    cfg = seeded(cfg, None)  # a copy (the memory format is resolved on it), run.seed = the one compare.seeds seed
    resolve_memory_format(cfg, DEVICE)
    logdir = logdir_of(cfg)
    logdir.mkdir(parents=True, exist_ok=True)
    progress = cfg.run.progress if progress is None else progress
    dtype = torch.float64 if float64 else torch.float32
    # float64 BatchNorm has no fast channels-last kernel on CPU (~50x slower): plain NCHW there.
    fmt = torch.channels_last if cfg.model.channels_last and not float64 else torch.contiguous_format
    threads = rank_threads(cfg.run.threads, 1)
    torch.set_num_threads(threads)
    ensure_betons(cfg.data, progress=progress)
    data = copy.deepcopy(cfg.data)
    data.channels_last = fmt == torch.channels_last  # batches arrive in the models' format, for evaluate too
    train_loader = build_train_loader(data, batch_size=cfg.data.batch_size, rank=0, world_size=1,
                                      seed=cfg.run.seed, dtype=torch.float32, device=DEVICE)
    val_loader = build_val_loader(data, batch_size=cfg.data.batch_size, rank=0, world_size=1,
                                  seed=cfg.run.seed, dtype=torch.float32, device=DEVICE)
    torch.set_num_threads(threads)
    x_probe = probe_batch(cfg).to(dtype).contiguous(memory_format=fmt)
    spe = len(train_loader)
    total = min(cfg.run.epochs * spe, cfg.run.max_steps or cfg.run.epochs * spe)

    state = _build_arms(cfg, arms, dtype, fmt, spe, total)
    result = CompareResult(logdir=logdir, arm_dirs={a: logdir / a for a in arms})
    gap = _LiveGap(cfg, state, x_probe, result.gap)
    arms_plain = {a: s.plain for a, s in state.items()}
    bar = tqdm(total=total, desc=f"{cfg.run.name} lockstep", dynamic_ncols=True, file=sys.stderr) if progress else None
    step = 0
    gap.measure(0)
    for s in state.values():
        s.plain.model.train()
    epoch = 0
    while epoch < cfg.run.epochs and step < total:
        train_loader.set_epoch(epoch)
        torch.set_num_threads(threads)
        for x, y in train_loader:
            torch.set_num_threads(threads)
            x = x.to(dtype).contiguous(memory_format=fmt)
            logs = (step + 1) % cfg.log.every_steps == 0 or step + 1 == total
            # the weights before a logged step, for its angular update (bigexp.run.angular), as the training loop
            before = {a: AngleSnapshot(s.plain.optimizer, s.group_names) for a, s in state.items()} if logs else {}
            for a, (loss, seconds) in step_together(arms_plain, x, y,
                                                    label_smoothing=cfg.optim.label_smoothing).items():
                s = state[a]
                s.seconds, s.imgs = s.seconds + seconds, s.imgs + x.shape[0]
                s.loss_sum, s.loss_n = s.loss_sum + float(loss), s.loss_n + 1
            step += 1
            if bar is not None:
                bar.update(1)
            if logs:
                _log_train(state, step, epoch, spe, before)
            if step % cfg.compare.probe_every_steps == 0 or step == total:
                gap.measure(step)
            if step >= total:
                break
        last = step >= total or epoch + 1 >= cfg.run.epochs
        if last or (epoch + 1) % cfg.run.eval_every_epochs == 0:
            _evaluate_arms(state, val_loader, dtype, threads, step)
        epoch += 1
    if bar is not None:
        bar.close()
    return _finish(cfg, state, gap, result, report=report)


def _finish(cfg: Config, state: dict, gap: _LiveGap, result: CompareResult, *, report: bool) -> CompareResult:
    for a, s in state.items():
        s.logger.close()
        result.results[a] = s.val
        if cfg.log.plots:
            plot_run(result.logdir / a)
    gap.close()
    result.layout_path = write_layout(result.logdir, cfg.run.name)
    if report:
        result.report = build_report(result.logdir)
    return result
