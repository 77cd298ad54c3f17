"""One training micro-step and one evaluation pass: the pieces the loop, `bigexp compare --lockstep` and bench/
share, so none of them carries a copy."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from bigexp.run.metrics import VAL_LOSS, VAL_TOP1, VAL_TOP5


def accuracy_counts(logits: torch.Tensor, target: torch.Tensor, ks=(1, 5)) -> list[int]:
    k_max = min(max(ks), logits.shape[1])
    top = logits.topk(k_max, dim=1).indices
    hit = top.eq(target.view(-1, 1))
    return [int(hit[:, :min(k, k_max)].any(dim=1).sum()) for k in ks]


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
    sums = torch.zeros(4, dtype=torch.float64)  # loss_sum, top1, top5, count
    for x, y in loader:
        x = x.to(ctx.device, dtype=dtype, non_blocking=True)
        y = y.to(ctx.device, non_blocking=True)
        logits = engine.ds(x).float()
        sums[0] += float(F.cross_entropy(logits, y, reduction="sum"))
        t1, t5 = accuracy_counts(logits, y)
        sums[1] += t1
        sums[2] += t5
        sums[3] += y.numel()
    ctx.all_reduce_sum(sums)
    model.train(was_training)
    n = max(float(sums[3]), 1.0)
    return {VAL_LOSS: float(sums[0]) / n, VAL_TOP1: 100.0 * float(sums[1]) / n, VAL_TOP5: 100.0 * float(sums[2]) / n}


def train_micro_step(engine, x: torch.Tensor, y: torch.Tensor, ctx, *, label_smoothing: float = 0.0,
                     stop_requested: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One micro-batch of the training loop (shared with bench/): inputs to the device in the engine's dtype,
    forward, loss, the per-micro-batch agreement all-reduce, then backward and the DeepSpeed step.

    Returns (loss, flags); flags[0] = ranks whose loss was non-finite, flags[1] = ranks asking to stop. When
    flags[0] > 0 nothing is applied (the caller raises), except under fp16, where DeepSpeed itself skips the
    update and lowers the loss scale.
    """
    x = x.to(ctx.device, dtype=engine.dtype, non_blocking=True)
    y = y.to(ctx.device, non_blocking=True)
    logits = engine.ds(x)
    loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
    # One small all-reduce per micro-batch: every rank must agree to stop (NaN) or checkpoint (preempt).
    flags = torch.tensor([0.0 if torch.isfinite(loss) else 1.0, 1.0 if stop_requested else 0.0])
    ctx.all_reduce_sum(flags)
    if flags[0] > 0 and engine.dtype != torch.float16:
        return loss, flags
    engine.ds.backward(loss)
    engine.ds.step()
    return loss, flags


def grad_norm(engine) -> float | None:
    """DeepSpeed's global gradient norm of the last step; None where the engine keeps none (or cannot say)."""
    try:
        g = engine.ds.get_global_grad_norm()
    except Exception:
        return None
    if g is None:
        return None
    return float(g)
