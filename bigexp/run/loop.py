"""The training loop of one arm (torch SGD baseline or ExpSGD) under DeepSpeed, FFCV data; `bigexp train` runs it.

Read `train()` top to bottom: setup -> data -> model and optimizer -> resume -> epochs of (steps, end of epoch) ->
finish. Each phase is one helper below it, in that order. What they share is a `Run` (what the run is built from,
filled in by the setup phases, then fixed) and a `LoopState` (where the run is: the part a checkpoint records).
The order of the setup phases is part of reproducibility: the model's init and the invariance check's example batch
draw from the seeded torch RNG, so a resumed run rebuilds exactly the model it checkpointed.
"""
from __future__ import annotations

import itertools
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm import tqdm

from bigexp.config import save_resolved, to_dict, validate
from bigexp.config.schema import Config
from bigexp.data.ensure import ensure_betons
from bigexp.data.loaders import build_train_loader, build_val_loader
from bigexp.errors import ConfigError, NonFiniteLossError
from bigexp.memory_format import check_cpu_channels_last, resolve_memory_format
from bigexp.models import build_model
from bigexp.optim.build import BuiltOptimizer, build_optimizer, group_stats
from bigexp.optim.schedules import ParamGroupScheduler, build_schedule
from bigexp.run.angular import AngleSnapshot
from bigexp.run.checkpoint import CheckpointManager, model_signature
from bigexp.run.distributed import DistContext, init_distributed, rank_threads, reset_threads
from bigexp.run.engine import Engine, build_engine, micro_batch_size, precision_dtype
from bigexp.run.faults import Faults
from bigexp.run.lock import hold_run_lock
from bigexp.run.metrics import (EVENTS_RENORM, RENORM_COUNT, TEXT_CONFIG, TEXT_INVARIANCE, TRAIN_EPOCH,
                                TRAIN_GRAD_NORM, TRAIN_IMG_PER_S, TRAIN_LOSS, TRAIN_LOSS_SCALE, TRAIN_STEP_TIME_S,
                                VAL_LOSS, VAL_TOP1, VAL_TOP5, TBLogger, hparam_tag, opt_stat)
from bigexp.run.signals import PreemptionFlag
from bigexp.run.step import StepResult, evaluate, grad_norm, sync_batchnorm_stats, train_step

StepHook = Callable[[int, Engine], None]


@dataclass
class TrainResult:
    run_dir: Path
    global_step: int = 0
    epoch: int = 0
    val: dict = field(default_factory=dict)
    preempted: bool = False
    history: list = field(default_factory=list)   # per-epoch dicts (val metrics, train loss)


@dataclass
class LoopState:
    """Where the run is. A checkpoint records (global_step, epoch, batch_in_epoch); a resume starts from them."""
    global_step: int = 0       # optimizer steps taken; the step being taken is global_step + 1 (as logged)
    epoch: int = 0
    batch_in_epoch: int = 0    # micro-batches of `epoch` consumed (grad_accum of them per step)
    last_renorms: Optional[float] = None  # renormalisations at the previous log line (not checkpointed)


@dataclass
class Run:
    """What one run is built from: set by the setup phases of `train()`, read by the loop."""
    cfg: Config
    ctx: DistContext
    run_dir: Path
    threads: int                            # torch CPU threads of this rank (FFCV resets them: reset_threads)
    faults: Faults
    preempt: PreemptionFlag
    step_hook: Optional[StepHook] = None
    dtype: torch.dtype = torch.float32      # of the model's inputs (engine.precision)
    train_loader: object = None
    val_loader: object = None
    steps_per_epoch: int = 0
    schedule_steps: int = 0                 # what the LR schedule spans: every epoch, whatever run.max_steps says
    total_steps: int = 0                    # where this run stops (run.max_steps, if sooner)
    built: Optional[BuiltOptimizer] = None
    engine: Optional[Engine] = None
    signature: Optional[dict] = None        # the model's, which a checkpoint must match
    ckpt: Optional[CheckpointManager] = None
    tb: Optional[TBLogger] = None


@dataclass
class _LogWindow:
    """Sums since the previous log line: the logged loss is their mean over every rank, img/s their rate."""
    loss_sum: Optional[torch.Tensor] = None  # float64 on the device: summed there, read once per log line
    loss_n: int = 0                          # micro-batches
    imgs: int = 0
    t0: float = field(default_factory=time.perf_counter)

    def add(self, out: StepResult, world_size: int) -> None:
        self.loss_sum = out.loss_sum if self.loss_sum is None else self.loss_sum + out.loss_sum
        self.loss_n += out.micro_batches
        self.imgs += out.images * world_size


def train(cfg: Config, *, ctx: Optional[DistContext] = None, logger: Optional[TBLogger] = None,
          step_hook: Optional[StepHook] = None, faults: Optional[Faults] = None) -> TrainResult:
    """Train one arm. `step_hook(global_step, engine)` runs after every optimizer step (compare/probes, tests),
    and once with global_step 0 before the first step of a fresh (not resumed) run: the initial state.
    `logger`: the caller's (it closes it); `faults`: test-only hooks, by default from the environment."""
    run = _setup(cfg, ctx, faults or Faults.from_env(), step_hook)
    lock = hold_run_lock(run.run_dir, run.ctx)  # before anything reads or writes the run dir; beside it (lock.py)
    _build_data(run)
    _build_model_and_optimizer(run)
    state, resumed_from = _resume(run)
    _open_run_dir(run)
    run.tb = logger or TBLogger(run.run_dir, enabled=cfg.log.tensorboard and run.ctx.is_main)
    if run.ctx.is_main and resumed_from is None:
        _log_texts(run)
    run.preempt.install()
    result = TrainResult(run_dir=run.run_dir, global_step=state.global_step, epoch=state.epoch)

    run.engine.ds.train()
    if step_hook is not None and state.global_step == 0:
        step_hook(0, run.engine)  # bigexp compare's equivalence gap at step 0 (both arms start identical)
    while state.epoch < cfg.run.epochs and state.global_step < run.total_steps:
        if _train_epoch(run, state):
            result.preempted = True
            break
        _end_of_epoch(run, state, result)

    run.preempt.restore()
    _finish(run, state, result, close_logger=logger is None)
    lock.release()
    return result


# ---------------------------------------------------------------------------------------------- setup
def _setup(cfg: Config, ctx: Optional[DistContext], faults: Faults, step_hook: Optional[StepHook]) -> Run:
    """Ranks, threads, seeds. The run directory is written only once data and checkpoint have loaded."""
    ctx = ctx or init_distributed(cfg.run.device)
    validate(cfg, world_size=ctx.world_size)
    resolve_memory_format(cfg, ctx.device)  # null channels-last keys -> the device's default, saved resolved
    threads = rank_threads(cfg.run.threads, ctx.local_world_size)
    reset_threads(threads)
    torch.manual_seed(cfg.run.seed)
    if cfg.run.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    return Run(cfg=cfg, ctx=ctx, run_dir=Path(cfg.run.out_dir) / cfg.run.name, threads=threads, faults=faults,
               preempt=PreemptionFlag(), step_hook=step_hook)


def _build_data(run: Run) -> None:
    """FFCV files (written once, by rank 0), loaders sharded across ranks, and the run's length in steps."""
    cfg, ctx = run.cfg, run.ctx
    ensure_betons(cfg.data, rank=ctx.rank, world_size=ctx.world_size, barrier=ctx.barrier,
                  progress=cfg.run.progress and ctx.is_main)
    micro = micro_batch_size(cfg, ctx.world_size)
    run.dtype = precision_dtype(cfg.engine.precision)
    run.train_loader = build_train_loader(cfg.data, batch_size=micro, rank=ctx.rank, world_size=ctx.world_size,
                                          seed=cfg.run.seed, dtype=run.dtype, device=str(ctx.device))
    run.val_loader = build_val_loader(cfg.data, batch_size=micro, rank=ctx.rank, world_size=ctx.world_size,
                                      seed=cfg.run.seed, dtype=run.dtype, device=str(ctx.device))
    reset_threads(run.threads)
    run.steps_per_epoch = len(run.train_loader) // cfg.engine.grad_accum
    if run.steps_per_epoch == 0:
        raise ConfigError(f"data.batch_size = {cfg.data.batch_size} is larger than the training set "
                          f"({cfg.data.train_beton}): no full step per epoch")
    # The schedule always spans all epochs: run.max_steps only stops early, so a run cut short and resumed
    # follows the same schedule as one that never stopped.
    run.schedule_steps = cfg.run.epochs * run.steps_per_epoch
    run.total_steps = min(run.schedule_steps, cfg.run.max_steps or run.schedule_steps)


def _build_model_and_optimizer(run: Run) -> None:
    """Model, param groups (invariant ones found from the graph and checked numerically), schedule, engine."""
    cfg = run.cfg
    model = build_model(cfg.model)
    check_cpu_channels_last(model, run.ctx.device, cfg.model.channels_last or cfg.data.channels_last)
    # The invariance check runs at <= 64 px: its cost grows with the resolution, its answer does not. On the CPU,
    # named: the model is still there (DeepSpeed moves it), and the loop's tensors all say where they live.
    check_res = min(cfg.data.val_res, 64)
    example = torch.randn(4, 3, check_res, check_res, device="cpu")
    if cfg.model.channels_last:
        example = example.contiguous(memory_format=torch.channels_last)
    run.built = build_optimizer(cfg, model, example)
    schedule = build_schedule(cfg.schedule, run.steps_per_epoch, run.schedule_steps)
    run.engine = build_engine(cfg, model, run.built.optimizer, lambda opt: ParamGroupScheduler(opt, schedule),
                              run.ctx)
    run.signature = model_signature(model)


def _resume(run: Run) -> tuple[LoopState, Optional[Path]]:
    """The newest valid checkpoint (weights, momentum, exp-LR state, scheduler, RNG, data position), if any:
    (where to start, the checkpoint or None)."""
    cfg = run.cfg
    run.ckpt = CheckpointManager(run.run_dir / "checkpoints", run.ctx, keep=cfg.run.keep_checkpoints,
                                 faults=run.faults)
    path = run.ckpt.find_resumable(cfg.run.resume)
    if path is None:
        return LoopState(), None
    run.ckpt.check_config(path, run.cfg, run.signature)  # before loading: its model, then config drift (drift.py)
    client = run.ckpt.load(run.engine, path, run.signature)
    state = LoopState(global_step=client["global_step"], epoch=client["epoch"],
                      batch_in_epoch=client["batch_in_epoch"])
    if client.get("exp_state") is not None and hasattr(run.built.optimizer, "load_exp_state_dict"):
        run.built.optimizer.load_exp_state_dict(client["exp_state"])
    if run.ctx.is_main:
        print(f"[bigexp] resumed from {path} at step {state.global_step} (epoch {state.epoch}, "
              f"batch {state.batch_in_epoch})", flush=True)
    return state, path


def _open_run_dir(run: Run) -> None:
    """Only now, with every input proven good, touch the run directory: a bad data path or a checkpoint of another
    model fails above and leaves an existing run exactly as it was."""
    if run.ctx.is_main:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        save_resolved(run.cfg, run.run_dir / "config.yaml")
    run.ctx.barrier()


def _log_texts(run: Run) -> None:
    """A fresh run's TensorBoard texts: the resolved config and the param-group report."""
    report = run.built.report
    run.tb.text(TEXT_CONFIG, (run.run_dir / "config.yaml").read_text())
    run.tb.text(TEXT_INVARIANCE, report.format() if hasattr(report, "format") else str(report))


# ---------------------------------------------------------------------------------------------- one epoch
def _train_epoch(run: Run, state: LoopState) -> bool:
    """The steps of `state.epoch` from micro-batch `state.batch_in_epoch` to the epoch's end, to the run's last
    step, or to a preemption. Returns True when preempted (the checkpoint is written).

    Whole accumulation groups only: an epoch's micro-batches past its last full group of engine.grad_accum are
    never run. Run, they would leave DeepSpeed mid-group at the epoch's end, its boundary out of phase with
    global_step from then on and their gradient leaking into the next epoch's first step, which a resume (starting
    on a boundary, with no gradient) could not reproduce. Host reads: one per step (train_step), plus log lines."""
    cfg, ctx = run.cfg, run.ctx
    group = cfg.engine.grad_accum
    run.train_loader.set_epoch(state.epoch)
    reset_threads(run.threads)
    first = state.batch_in_epoch  # a multiple of group: checkpoints are written at step boundaries
    batches = run.train_loader.iter_from(first) if first else iter(run.train_loader)
    reset_threads(run.threads)
    bar = tqdm(total=run.steps_per_epoch, initial=first // group, desc=f"{cfg.run.name} epoch "
               f"{state.epoch}", leave=False, dynamic_ncols=True, file=sys.stderr,
               disable=not (cfg.run.progress and ctx.is_main))
    window, preempted = _LogWindow(), False
    for _ in range(run.steps_per_epoch - first // group):
        t0 = time.perf_counter()
        micro = itertools.islice(batches, group)
        logs = _logs_at(run, state.global_step + 1)
        # A logged step's angular update needs the weights before it: a copy of the invariant groups, on logging
        # steps only (steady steps copy and read nothing; bigexp.run.angular).
        before = AngleSnapshot(run.built.optimizer, run.built.group_names) if logs else None
        if run.faults.nan_at_step == state.global_step + 1:
            micro = ((torch.full_like(x, float("nan")), y) for x, y in micro)
        out = train_step(run.engine, micro, ctx, label_smoothing=cfg.optim.label_smoothing,
                         stop_requested=run.preempt.requested)
        if not out.applied:  # a non-finite loss on some rank (under fp16 DeepSpeed skips it and lowers the scale)
            raise _non_finite_loss(run, state, out)
        state.batch_in_epoch += out.micro_batches
        window.add(out, ctx.world_size)
        state.global_step += 1
        bar.update(1)
        if run.step_hook is not None:
            run.step_hook(state.global_step, run.engine)
        if run.faults.step_delay_s is not None:
            time.sleep(run.faults.step_delay_s)
        if logs:
            _log_step(run, state, window, t0, bar, before)
            window = _LogWindow()
        if out.stop_ranks:  # preemption: checkpoint at this step boundary and leave
            _save(run, state)
            if ctx.is_main:
                print(f"[bigexp] preempted: checkpoint at step {state.global_step}; rerun with --resume auto",
                      flush=True)
            preempted = True
            break
        if cfg.run.checkpoint_every_steps and state.global_step % cfg.run.checkpoint_every_steps == 0:
            _save(run, state)
        if state.global_step >= run.total_steps:
            break
    bar.close()
    if hasattr(batches, "close"):
        batches.close()  # left unfinished (dropped micro-batches, a break): stop the loader's thread now, not at GC
    return preempted


def _non_finite_loss(run: Run, state: LoopState, out: StepResult) -> NonFiniteLossError:
    newest = run.ckpt.list()
    # Step numbers as logged and checkpointed: this would have become step global_step + 1; the loss is the step's
    # mean over its micro-batches (non-finite if any one was).
    return NonFiniteLossError(
        f"non-finite loss ({float(out.loss_sum) / out.micro_batches}) at step {state.global_step + 1} "
        f"(epoch {state.epoch}, "
        f"batch {state.batch_in_epoch}) of {run.run_dir}; nothing was applied. "
        f"Last checkpoint: {newest[0] if newest else 'none'}")


def _logs_at(run: Run, step: int) -> bool:
    """Whether optimizer step `step` (as logged) writes a log line: every log.every_steps, and the run's last."""
    return step % run.cfg.log.every_steps == 0 or step == run.total_steps


def _log_step(run: Run, state: LoopState, window: _LogWindow, t0: float, bar, before: AngleSnapshot) -> None:
    """One log line: the window's loss (mean over every rank: a collective, so every rank logs at the same steps),
    throughput, the last step's time and grad norm, per-group optimizer statistics, the invariant groups' angular
    update against `before` (the weights before this step) beside its theory, renormalisations since the previous
    line."""
    cfg = run.cfg
    stats = group_stats(run.built.optimizer, run.built.group_names)
    theory = before.measure(run.built.optimizer)  # a collective too, through the norms' reduction
    mean_loss = torch.stack((window.loss_sum, window.loss_sum.new_tensor(float(window.loss_n))))  # on the device
    run.ctx.all_reduce_sum(mean_loss)
    dt = time.perf_counter() - window.t0
    scalars = {TRAIN_LOSS: float(mean_loss[0] / mean_loss[1]), TRAIN_IMG_PER_S: window.imgs / dt,
               TRAIN_STEP_TIME_S: time.perf_counter() - t0, TRAIN_GRAD_NORM: grad_norm(run.engine),
               TRAIN_LOSS_SCALE: run.engine.loss_scale() if cfg.engine.precision == "fp16" else None,
               TRAIN_EPOCH: state.epoch + state.batch_in_epoch / max(1, len(run.train_loader)), **stats, **theory}
    renorms = sum(v for tag, v in stats.items() if opt_stat(tag) == RENORM_COUNT)
    if state.last_renorms is not None and renorms > state.last_renorms:
        scalars[EVENTS_RENORM] = renorms - state.last_renorms
    state.last_renorms = renorms
    run.tb.scalars(state.global_step, scalars)
    bar.set_postfix(loss=f"{scalars[TRAIN_LOSS]:.3f}", img_s=f"{scalars[TRAIN_IMG_PER_S]:.0f}")


def _save(run: Run, state: LoopState) -> None:
    """A checkpoint of this step (collective). Its client state is where a resume starts: `state`'s position."""
    exp = run.built.optimizer.exp_state_dict() if hasattr(run.built.optimizer, "exp_state_dict") else None
    client = {"global_step": state.global_step, "epoch": state.epoch, "batch_in_epoch": state.batch_in_epoch,
              "exp_state": exp, "arm": run.cfg.optim.optimizer, "config": to_dict(run.cfg)}
    run.ckpt.save(run.engine, client, state.global_step, run.signature)


# ---------------------------------------------------------------------------------------------- end of epoch
def _end_of_epoch(run: Run, state: LoopState, result: TrainResult) -> None:
    """After an epoch's steps (or the run's last step): consistent BN stats, eval when due, a checkpoint; `state`
    moves to the next epoch when this one was completed."""
    cfg = run.cfg
    completed = state.batch_in_epoch >= run.steps_per_epoch * cfg.engine.grad_accum
    next_epoch = state.epoch + 1 if completed else state.epoch
    sync_batchnorm_stats(run.engine.ds.module, run.ctx)
    is_last = state.global_step >= run.total_steps or next_epoch >= cfg.run.epochs
    if is_last or (state.epoch + 1) % cfg.run.eval_every_epochs == 0:
        _evaluate(run, state, result)
    if completed:
        state.epoch, state.batch_in_epoch = next_epoch, 0
    _save(run, state)
    run.tb.flush()


def _evaluate(run: Run, state: LoopState, result: TrainResult) -> None:
    """Val metrics: to TensorBoard, into the result's history, and one summary line."""
    val = evaluate(run.engine, run.val_loader, run.ctx, run.dtype)
    reset_threads(run.threads)
    run.tb.scalars(state.global_step, val)
    result.val = val
    result.history.append({"epoch": state.epoch, "global_step": state.global_step, **val})
    if run.ctx.is_main:
        print(f"[bigexp] {run.cfg.run.name} epoch {state.epoch} step {state.global_step}: val top1 "
              f"{val[VAL_TOP1]:.2f}% top5 {val[VAL_TOP5]:.2f}% loss {val[VAL_LOSS]:.4f}", flush=True)


# ---------------------------------------------------------------------------------------------- finish
def _finish(run: Run, state: LoopState, result: TrainResult, *, close_logger: bool) -> None:
    """hparams, plots, the logger closed when it is ours (the process group is the caller's)."""
    cfg, ctx = run.cfg, run.ctx
    result.global_step, result.epoch = state.global_step, state.epoch
    if ctx.is_main and not result.preempted and result.val:
        run.tb.hparams({"arm": cfg.optim.optimizer, "lr": cfg.optim.lr, "momentum": cfg.optim.momentum,
                        "weight_decay": cfg.optim.weight_decay, "schedule": cfg.schedule.kind,
                        "batch_size": cfg.data.batch_size, "precision": cfg.engine.precision,
                        "arch": cfg.model.arch, "world_size": ctx.world_size},
                       {hparam_tag(tag): v for tag, v in result.val.items()})
    if close_logger:
        run.tb.close()
    if ctx.is_main and cfg.log.plots and not result.preempted:
        try:
            # Imported here: bigexp.analysis sits above run/ (its runner imports this module), and the plots are
            # its one use in a training process, only with log.plots. ImportError: no matplotlib, no plots.
            from bigexp.analysis.report import plot_run

            plot_run(run.run_dir)
        except ImportError:
            pass
