"""`bigexp train --config X [overrides]`: one arm (torch SGD baseline or ExpSGD) under DeepSpeed, FFCV data.

Runs alone, under torchrun (single/multi-node), the deepspeed launcher, or srun. Read `train()` top to bottom:
setup -> data -> model -> optimizer/schedule -> engine -> resume -> epochs of (steps, eval, checkpoint) -> finish.
"""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from bigexp.config.schema import Config
from bigexp.errors import ConfigError, NonFiniteLossError
from bigexp.memory_format import check_cpu_channels_last, resolve_memory_format
from bigexp.run.signals import PreemptionFlag
from bigexp.run.step import evaluate, grad_norm, sync_batchnorm_stats, train_micro_step




# Test-only fault injection (tests/test_reliability*.py), read once; unset in real runs.
#   BIGEXP_TEST_NAN_AT_STEP=N     step N (1-based, as logged) gets NaN inputs, so its loss is NaN
#   BIGEXP_TEST_STEP_DELAY_S=S    sleep S seconds after each step, so a test can signal a run mid-flight
_TEST_NAN_AT_STEP = int(os.environ.get("BIGEXP_TEST_NAN_AT_STEP", "0"))
_TEST_STEP_DELAY_S = float(os.environ.get("BIGEXP_TEST_STEP_DELAY_S", "0"))


@dataclass
class TrainResult:
    run_dir: Path
    global_step: int = 0
    epoch: int = 0
    val: dict = field(default_factory=dict)
    preempted: bool = False
    history: list = field(default_factory=list)   # per-epoch dicts (val metrics, train loss)


# ---------------------------------------------------------------------------------------------- CLI
def add_arguments(parser) -> None:
    from bigexp.config import add_config_arguments

    add_config_arguments(parser)
    parser.add_argument("--resume", default=None,
                        help="'auto' (newest valid checkpoint of this run), 'never', or a checkpoint directory; "
                             "overrides run.resume")


def run(args) -> int:
    from bigexp.config import config_from_args_or_exit

    cfg = config_from_args_or_exit(args, world_size=int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", 1))))
    if args.resume is not None:
        cfg.run.resume = args.resume
    from bigexp.run.checkpoint import CheckpointError
    from bigexp.data.write import DataError
    from bigexp.run.distributed import exit_process, shutdown_distributed

    try:
        train(cfg)
    except NonFiniteLossError as e:
        print(f"bigexp train: {e}", file=sys.stderr)
        shutdown_distributed()
        exit_process(3)
    except (DataError, CheckpointError, ConfigError) as e:
        # Bad input (a data file, a checkpoint): one line naming it, status 2 like a config error. No barrier on
        # the way out: the other ranks may not have hit the same error and would never join one.
        rank = os.environ.get("RANK", "0")
        print(f"bigexp train: {'' if rank == '0' else f'[rank {rank}] '}{e}", file=sys.stderr, flush=True)
        exit_process(2)
    shutdown_distributed()
    exit_process(0)


# ---------------------------------------------------------------------------------------------- helpers

def _set_threads(cfg: Config, ctx) -> int:
    n = cfg.run.threads or max(1, (os.cpu_count() or 1) // max(1, ctx.local_world_size))
    torch.set_num_threads(n)
    return n


# ---------------------------------------------------------------------------------------------- train
def train(cfg: Config, *, ctx=None, logger=None, step_hook=None) -> TrainResult:
    """Train one arm. `step_hook(global_step, engine)` runs after every optimizer step (compare/probes, tests),
    and once with global_step 0 before the first step of a fresh (not resumed) run: the initial state."""
    from bigexp.run.checkpoint import CheckpointManager, model_signature
    from bigexp.config import save_resolved, to_dict, validate
    from bigexp.data.loaders import build_train_loader, build_val_loader
    from bigexp.data.write import ensure_betons
    from bigexp.run.distributed import init_distributed
    from bigexp.run.engine import build_engine
    from bigexp.models import build_model
    from bigexp.optim.build import build_optimizer, group_stats
    from bigexp.optim.schedules import ParamGroupScheduler, build_schedule
    from bigexp.run.metrics import TBLogger

    # --- setup: ranks, threads, seeds (the run directory is written only once data and checkpoint have loaded)
    ctx = ctx or init_distributed(cfg.run.device)
    validate(cfg, world_size=ctx.world_size)
    resolve_memory_format(cfg, ctx.device)  # null channels-last keys -> the device's default, saved resolved
    threads = _set_threads(cfg, ctx)
    torch.manual_seed(cfg.run.seed)
    if cfg.run.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    run_dir = Path(cfg.run.out_dir) / cfg.run.name

    # --- data: FFCV files (written once, by rank 0), loaders sharded across ranks
    ensure_betons(cfg.data, rank=ctx.rank, world_size=ctx.world_size, barrier=ctx.barrier,
                  progress=cfg.run.progress and ctx.is_main)
    micro = cfg.data.batch_size // (ctx.world_size * cfg.engine.grad_accum)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.engine.precision]
    train_loader = build_train_loader(cfg.data, batch_size=micro, rank=ctx.rank, world_size=ctx.world_size,
                                      seed=cfg.run.seed, dtype=dtype, device=str(ctx.device))
    val_loader = build_val_loader(cfg.data, batch_size=micro, rank=ctx.rank, world_size=ctx.world_size,
                                  seed=cfg.run.seed, dtype=dtype, device=str(ctx.device))
    torch.set_num_threads(threads)  # ffcv resets torch's thread count when it builds loaders
    steps_per_epoch = len(train_loader) // cfg.engine.grad_accum
    if steps_per_epoch == 0:
        raise ValueError(f"data.batch_size = {cfg.data.batch_size} is larger than the training set "
                         f"({cfg.data.train_beton}): no full step per epoch")
    # The schedule always spans all epochs: run.max_steps only stops early, so a run cut short and resumed
    # follows the same schedule as one that never stopped.
    schedule_steps = cfg.run.epochs * steps_per_epoch
    total_steps = min(schedule_steps, cfg.run.max_steps or schedule_steps)

    # --- model and optimizer: invariant groups found from the graph and checked numerically
    model = build_model(cfg.model)
    check_cpu_channels_last(model, ctx.device, cfg.model.channels_last or cfg.data.channels_last)
    check_res = min(cfg.data.val_res, 64)
    example = torch.randn(4, 3, check_res, check_res)
    if cfg.model.channels_last:
        example = example.contiguous(memory_format=torch.channels_last)
    built = build_optimizer(cfg, model, example)
    schedule = build_schedule(cfg.schedule, steps_per_epoch, schedule_steps)
    engine = build_engine(cfg, model, built.optimizer, lambda opt: ParamGroupScheduler(opt, schedule), ctx)
    signature = model_signature(model)

    # --- resume: newest valid checkpoint (weights, momentum, exp-LR state, scheduler, RNG, data position)
    ckpt = CheckpointManager(run_dir / "checkpoints", ctx, keep=cfg.run.keep_checkpoints)
    global_step, start_epoch, start_batch = 0, 0, 0
    resume_path = ckpt.find_resumable(cfg.run.resume)
    if resume_path is not None:
        client = ckpt.load(engine, resume_path, signature)
        global_step, start_epoch, start_batch = client["global_step"], client["epoch"], client["batch_in_epoch"]
        if client.get("exp_state") is not None and hasattr(built.optimizer, "load_exp_state_dict"):
            built.optimizer.load_exp_state_dict(client["exp_state"])
        if ctx.is_main:
            print(f"[bigexp] resumed from {resume_path} at step {global_step} (epoch {start_epoch}, "
                  f"batch {start_batch})", flush=True)
    # Only now, with every input proven good, touch the run directory: a bad data path or a checkpoint of another
    # model fails above and leaves an existing run exactly as it was.
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_resolved(cfg, run_dir / "config.yaml")
    ctx.barrier()

    def client_state(epoch: int, batch_in_epoch: int) -> dict:
        exp = built.optimizer.exp_state_dict() if hasattr(built.optimizer, "exp_state_dict") else None
        return {"global_step": global_step, "epoch": epoch, "batch_in_epoch": batch_in_epoch, "exp_state": exp,
                "arm": cfg.optim.optimizer, "config": to_dict(cfg)}

    # --- logging (rank 0): resolved config, the param-group report, hparams at the end
    own_logger = logger is None
    tb = logger or TBLogger(run_dir, enabled=cfg.log.tensorboard and ctx.is_main)
    if ctx.is_main and resume_path is None:
        tb.text("config", (run_dir / "config.yaml").read_text())
        tb.text("invariance", built.report.format() if hasattr(built.report, "format") else str(built.report))
    preempt = PreemptionFlag()
    preempt.install()
    result = TrainResult(run_dir=run_dir, global_step=global_step, epoch=start_epoch)
    last_renorms = None

    # --- the loop
    engine.ds.train()
    if step_hook is not None and global_step == 0:
        step_hook(0, engine)  # bigexp compare's equivalence gap at step 0 (both arms start identical)
    epoch = start_epoch
    while epoch < cfg.run.epochs and global_step < total_steps:
        train_loader.set_epoch(epoch)
        torch.set_num_threads(threads)
        first_batch = start_batch if epoch == start_epoch else 0
        batches = train_loader.iter_from(first_batch) if first_batch else iter(train_loader)
        torch.set_num_threads(threads)
        bar = None
        if cfg.run.progress and ctx.is_main:
            from tqdm import tqdm
            bar = tqdm(total=steps_per_epoch, initial=first_batch // cfg.engine.grad_accum,
                       desc=f"{cfg.run.name} epoch {epoch}", leave=False, dynamic_ncols=True, file=sys.stderr)
        loss_sum, loss_n, t_log, imgs_log = 0.0, 0, time.perf_counter(), 0
        batch_in_epoch = first_batch
        for x, y in batches:
            t0 = time.perf_counter()
            if _TEST_NAN_AT_STEP and global_step + 1 == _TEST_NAN_AT_STEP:
                x = torch.full_like(x, float("nan"))
            loss, flags = train_micro_step(engine, x, y, ctx, label_smoothing=cfg.optim.label_smoothing,
                                           stop_requested=preempt.requested)
            if flags[0] > 0 and cfg.engine.precision != "fp16":
                last = ckpt.list()
                # Step numbers as logged and checkpointed: this would have become step global_step + 1.
                raise NonFiniteLossError(
                    f"non-finite loss ({float(loss)}) at step {global_step + 1} (epoch {epoch}, "
                    f"batch {batch_in_epoch}) of {run_dir}; nothing was applied. "
                    f"Last checkpoint: {last[0] if last else 'none'}")
            batch_in_epoch += 1
            loss_sum += float(loss.detach())
            loss_n += 1
            imgs_log += x.shape[0] * ctx.world_size
            if batch_in_epoch % cfg.engine.grad_accum:
                continue
            global_step += 1
            if bar is not None:
                bar.update(1)
            if step_hook is not None:
                step_hook(global_step, engine)
            if _TEST_STEP_DELAY_S:
                time.sleep(_TEST_STEP_DELAY_S)

            if global_step % cfg.log.every_steps == 0 or global_step == total_steps:
                stats = group_stats(built.optimizer, built.group_names)
                mean_loss = torch.tensor([loss_sum, float(loss_n)], dtype=torch.float64)
                ctx.all_reduce_sum(mean_loss)
                dt = time.perf_counter() - t_log
                scalars = {"train/loss": float(mean_loss[0] / mean_loss[1]), "train/img_per_s": imgs_log / dt,
                           "train/step_time_s": time.perf_counter() - t0, "train/grad_norm": grad_norm(engine),
                           "train/loss_scale": engine.loss_scale() if cfg.engine.precision == "fp16" else None,
                           "train/epoch": epoch + batch_in_epoch / max(1, len(train_loader)), **stats}
                renorms = sum(v for k, v in stats.items() if k.endswith("/renorm_count"))
                if last_renorms is not None and renorms > last_renorms:
                    scalars["events/renorm"] = renorms - last_renorms
                last_renorms = renorms
                tb.scalars(global_step, scalars)
                if bar is not None:
                    bar.set_postfix(loss=f"{scalars['train/loss']:.3f}", img_s=f"{scalars['train/img_per_s']:.0f}")
                loss_sum, loss_n, t_log, imgs_log = 0.0, 0, time.perf_counter(), 0

            if flags[1] > 0:  # preemption: checkpoint at this step boundary and leave
                ckpt.save(engine, client_state(epoch, batch_in_epoch), global_step, signature)
                if ctx.is_main:
                    print(f"[bigexp] preempted: checkpoint at step {global_step}; rerun with --resume auto",
                          flush=True)
                result.preempted = True
                break
            if cfg.run.checkpoint_every_steps and global_step % cfg.run.checkpoint_every_steps == 0:
                ckpt.save(engine, client_state(epoch, batch_in_epoch), global_step, signature)
            if global_step >= total_steps:
                break
        if bar is not None:
            bar.close()
        if result.preempted:
            break
        end_of_epoch = batch_in_epoch >= steps_per_epoch * cfg.engine.grad_accum
        next_epoch = epoch + 1 if end_of_epoch else epoch

        # --- end of epoch (or of max_steps): consistent BN stats, eval, summary line, checkpoint
        sync_batchnorm_stats(engine.ds.module, ctx)
        last = global_step >= total_steps or next_epoch >= cfg.run.epochs
        if last or (epoch + 1) % cfg.run.eval_every_epochs == 0:
            val = evaluate(engine, val_loader, ctx, dtype)
            torch.set_num_threads(threads)
            tb.scalars(global_step, val)
            result.val = val
            result.history.append({"epoch": epoch, "global_step": global_step, **val})
            if ctx.is_main:
                print(f"[bigexp] {cfg.run.name} epoch {epoch} step {global_step}: val top1 {val['val/top1']:.2f}% "
                      f"top5 {val['val/top5']:.2f}% loss {val['val/loss']:.4f}", flush=True)
        ckpt.save(engine, client_state(next_epoch, 0 if end_of_epoch else batch_in_epoch), global_step, signature)
        tb.flush()
        epoch = next_epoch

    # --- finish: hparams, plots, clean shutdown of the logger (the process group is the caller's)
    preempt.restore()
    result.global_step, result.epoch = global_step, epoch
    if ctx.is_main and not result.preempted and result.val:
        tb.hparams({"arm": cfg.optim.optimizer, "lr": cfg.optim.lr, "momentum": cfg.optim.momentum,
                    "weight_decay": cfg.optim.weight_decay, "schedule": cfg.schedule.kind,
                    "batch_size": cfg.data.batch_size, "precision": cfg.engine.precision,
                    "arch": cfg.model.arch, "world_size": ctx.world_size},
                   {"hparam/" + k.split("/")[1]: v for k, v in result.val.items()})
    if own_logger:
        tb.close()
    if ctx.is_main and cfg.log.plots and not result.preempted:
        try:
            from bigexp.analysis.plots import plot_run
            plot_run(run_dir)
        except ImportError:
            pass
    return result
