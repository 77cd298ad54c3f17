"""The two training arms the step benchmarks compare, built from bigexp's own code.

bigexp: Config -> build_model -> build_optimizer (ExpSGD on the invariant + plain groups) -> build_schedule ->
        build_engine (DeepSpeed) and, per step, `bigexp.run.step.train_micro_step`: the very function the training
        loop calls (move, forward, loss, agreement all-reduce, backward, DeepSpeed step).
plain:  the same model object's deep copy (same init), torch.optim.SGD(foreach=True, momentum, weight_decay)
        over model.parameters(), and the loop a PyTorch user writes: zero_grad, forward (bf16 via autocast),
        cross-entropy, backward, step.
Both see the same fixed batch (random pixels, random labels) every step: the benchmark measures the step, not
the loader (bench/data.py does that).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "bf16_autocast": torch.float32}


@dataclass
class Arm:
    name: str
    step: Callable[[], None]   # one optimizer step on the fixed batch
    model: torch.nn.Module
    batch: int                 # images per step on this rank


def make_config(arch: str, res: int, batch: int, precision: str, *, world_size: int = 1, optimizer="expsgd",
                channels_last: bool = True, device: str = "auto"):
    from bigexp.config.schema import Config

    cfg = Config()
    cfg.run.device = device
    cfg.model.arch = arch
    cfg.model.num_classes = 1000 if arch in ("resnet50", "resnet18") else 10
    cfg.model.channels_last = channels_last
    cfg.data.batch_size = batch * world_size
    cfg.data.min_res = cfg.data.max_res = cfg.data.val_res = res
    cfg.engine.precision = precision
    cfg.optim.optimizer = optimizer
    return cfg


def fixed_batch(cfg, batch: int, res: int, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, res, res, generator=g)
    if cfg.model.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, cfg.model.num_classes, (batch,), generator=g)
    return x.to(device), y.to(device)


def build_pair(cfg, ctx, *, res: int, batch: int, seed: int = 0, with_plain: bool = True):
    """(bigexp Arm, plain Arm or None) for one config; both start from the same weights."""
    from bigexp.run.engine import build_engine
    from bigexp.models import build_model
    from bigexp.optim.build import build_optimizer
    from bigexp.optim.schedules import ParamGroupScheduler, build_schedule
    from bigexp.run.step import train_micro_step

    torch.manual_seed(seed)
    model = build_model(cfg.model)
    plain_model = copy.deepcopy(model) if with_plain else None

    # bigexp: exactly train()'s sequence of builders (invariance check at <= 64 px, as train() does)
    check_res = min(res, 64)
    example = torch.randn(4, 3, check_res, check_res)
    if cfg.model.channels_last:
        example = example.contiguous(memory_format=torch.channels_last)
    model = model.to(ctx.device)
    built = build_optimizer(cfg, model, example.to(ctx.device))
    schedule = build_schedule(cfg.schedule, 1000, 1000 * cfg.run.epochs)
    engine = build_engine(cfg, model, built.optimizer, lambda opt: ParamGroupScheduler(opt, schedule), ctx)
    engine.ds.train()
    x, y = fixed_batch(cfg, batch, res, ctx.device, seed)  # fp32 here: train_micro_step casts like the loop

    def bigexp_step():
        train_micro_step(engine, x, y, ctx, label_smoothing=cfg.optim.label_smoothing)

    a = Arm("bigexp", bigexp_step, engine.ds.module, batch)
    a.engine = engine
    if plain_model is None:
        return a, None

    plain_model = plain_model.to(ctx.device).train()
    opt = torch.optim.SGD(plain_model.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                          weight_decay=cfg.optim.weight_decay, foreach=True)
    use_autocast = cfg.engine.precision in ("bf16", "bf16_autocast")
    dev_type = ctx.device.type

    def plain_step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev_type, dtype=torch.bfloat16, enabled=use_autocast):
            logits = plain_model(x)
        loss = F.cross_entropy(logits.float(), y)
        loss.backward()
        opt.step()

    return a, Arm("plain", plain_step, plain_model, batch)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def images_per_s(arm: Arm, steps: int, device, world_size: int = 1) -> Callable[[], float]:
    """A measurement: `steps` steps of `arm`, returning images/s over all ranks."""
    import time

    def run() -> float:
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            arm.step()
        sync(device)
        return steps * arm.batch * world_size / (time.perf_counter() - t0)
    return run
