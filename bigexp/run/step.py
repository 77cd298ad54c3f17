"""One training step and one evaluation pass: the pieces the loop, `bigexp compare --lockstep` and bench/ share, so
none of them carries a copy.

Device discipline (project issues 14 and 17): every tensor these functions hand to a collective is made on
`ctx.device`, and what they accumulate (the step's loss, the val sums) stays there; a value reaches the host once per
step (the ranks' NaN/stop agreement) and once per evaluation pass (the summed metrics). On a GPU each read waits
for the stream, so a read per micro-batch or per val batch would serialise the host with the device.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F

from bigexp.run.metrics import VAL_LOSS, VAL_TOP1, VAL_TOP5


def hit_counts(logits: torch.Tensor, target: torch.Tensor, ks=(1, 5)) -> torch.Tensor:
    """Top-k hits for each k in `ks` (int64 [len(ks)], on the logits' device: no host read)."""
    k_max = min(max(ks), logits.shape[1])
    top = logits.topk(k_max, dim=1).indices
    hit = top.eq(target.view(-1, 1))
    return torch.stack([hit[:, :min(k, k_max)].any(dim=1).sum() for k in ks])


@torch.no_grad()
def sync_batchnorm_stats(model: torch.nn.Module, ctx) -> None:
    """Average BN running statistics over ranks so every rank evaluates (and checkpoints) the same model."""
    if ctx.world_size == 1:
        return
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            for buf in (m.running_mean, m.running_var):
                if buf is not None:
                    ctx.all_reduce_sum(buf)
                    buf.div_(ctx.world_size)


@torch.no_grad()
def evaluate(engine, loader, ctx, dtype) -> dict:
    """Val loss, top-1 and top-5 (percent) over the whole val set, summed across ranks."""
    model = engine.ds.module
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=ctx.device)  # loss_sum, top1, top5, count
    for x, y in loader:
        x = x.to(ctx.device, dtype=dtype, non_blocking=True)
        y = y.to(ctx.device, non_blocking=True)
        logits = engine.ds(x).float()
        sums[0] += F.cross_entropy(logits, y, reduction="sum")
        sums[1:3] += hit_counts(logits, y)
        sums[3] += y.numel()
    ctx.all_reduce_sum(sums)
    model.train(was_training)
    loss_sum, top1, top5, count = sums.tolist()  # the pass's one host read
    n = max(count, 1.0)
    return {VAL_LOSS: loss_sum / n, VAL_TOP1: 100.0 * top1 / n, VAL_TOP5: 100.0 * top5 / n}


@dataclass
class StepResult:
    """What one optimizer step (`train_step`) did on this rank."""
    loss_sum: torch.Tensor  # sum of its micro-batches' mean losses: 0-d float64 on ctx.device (not read)
    micro_batches: int
    images: int             # this rank's samples in the step
    non_finite: int         # micro-batches with a non-finite loss, summed over every rank (agreed: same on all)
    stop_ranks: int         # ranks asking to stop (preemption), agreed the same way
    applied: bool           # the engine stepped: False when non_finite > 0, except under fp16 (below)


def _micro_loss(engine, x: torch.Tensor, y: torch.Tensor, ctx, label_smoothing: float) -> torch.Tensor:
    """Forward one micro-batch: inputs to the device in the engine's dtype, the loss in fp32."""
    x = x.to(ctx.device, dtype=engine.dtype, non_blocking=True)
    y = y.to(ctx.device, non_blocking=True)
    return F.cross_entropy(engine.ds(x).float(), y, label_smoothing=label_smoothing)


def train_step(engine, micro_batches: Iterable, ctx, *, label_smoothing: float = 0.0,
               stop_requested: bool = False) -> StepResult:
    """One optimizer step of the training loop (shared with bench/): DeepSpeed's `gradient_accumulation_steps()`
    micro-batches (x, y) taken from `micro_batches`, each forward + backward; one all-reduce in which the ranks agree
    on a non-finite loss (stop, apply nothing) or a stop request (checkpoint at this step); then the step.

    Nothing partial: fewer micro-batches than an accumulation group raise ValueError (nothing is applied, but the
    engine holds their gradients), so DeepSpeed's boundary and the caller's step count cannot drift apart.
    A non-finite loss on a micro-batch before the last reaches backward (into gradients no step will apply: the
    caller stops); under fp16 the step runs anyway, DeepSpeed skipping the update and lowering the loss scale.
    """
    group = engine.ds.gradient_accumulation_steps()
    loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)  # float64: the sum the log used to take
    bad = torch.zeros((), device=ctx.device)
    images = taken = 0
    for x, y in micro_batches:
        taken += 1
        loss = _micro_loss(engine, x, y, ctx, label_smoothing)
        loss_sum += loss.detach()
        bad += ~torch.isfinite(loss.detach())
        images += x.shape[0]
        if taken < group:
            engine.ds.backward(loss)
            engine.ds.step()  # inside the accumulation group: DeepSpeed only counts the micro-step
            continue
        flags = torch.stack((bad, bad.new_tensor(1.0 if stop_requested else 0.0)))
        ctx.all_reduce_sum(flags)
        non_finite, stop = (int(v) for v in flags.tolist())  # the step's one host read, the same on every rank
        applied = non_finite == 0 or engine.dtype == torch.float16
        if applied:
            engine.ds.backward(loss)
            engine.ds.step()
        return StepResult(loss_sum, group, images, non_finite, stop, applied)
    raise ValueError(f"train_step: {group} micro-batches (engine.grad_accum) make a step; the iterator gave {taken}")


def train_micro_step(engine, x: torch.Tensor, y: torch.Tensor, ctx, *, label_smoothing: float = 0.0,
                     stop_requested: bool = False) -> StepResult:
    """`train_step` on one micro-batch: a whole step when engine.grad_accum is 1 (bench/, tests/dist)."""
    return train_step(engine, [(x, y)], ctx, label_smoothing=label_smoothing, stop_requested=stop_requested)


def grad_norm(engine) -> float | None:
    """DeepSpeed's global gradient norm of the last step; None where the engine keeps none (or cannot say)."""
    try:
        g = engine.ds.get_global_grad_norm()
    except Exception:
        return None
    if g is None:
        return None
    return float(g)
