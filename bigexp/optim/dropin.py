"""Drop ExpSGD into someone else's training script: one line instead of `torch.optim.SGD(model.parameters(), ...)`.

    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)        # before
    opt = ExpSGD.for_model(model, example_batch, lr=0.1, momentum=0.9, weight_decay=1e-4)    # after

The returned optimizer is the exact exponential-LR twin of that SGD: the scale-invariant weights (found from the
traced graph and checked numerically, `opt.invariance_report`) are stepped without weight decay and with the
exponential LR derived each step from group['lr'] / group['weight_decay'] (so any torch LR scheduler that writes
group['lr'] -- StepLR, CosineAnnealingLR, OneCycleLR, LambdaLR, SequentialLR -- drives it as it drives SGD);
every other parameter is plain SGD with the same weight decay; the BatchNorm running statistics are rescaled at
each renormalisation. A GradScaler that skips a step skips ExpSGD's step, and with it all its bookkeeping.

Under DDP nothing more is needed (every rank holds whole, identical weights). Under DeepSpeed call
`attach_deepspeed(engine, opt)` after `deepspeed.initialize`: with sharded fp32 masters (ZeRO 1, BF16_Optimizer)
each group's norm needs a sum over the data-parallel ranks.

`GradCosAudit` is a runtime check of the one property everything rests on: the gradient of a scale-invariant loss
is orthogonal to its weights, so |cos(g, w)| of an invariant group sits at float noise; a larger value means the
group is not invariant (a missed dependency, a module the detector mis-modelled) and it warns once, naming it.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from bigexp.optim.invariance import param_groups, running_stats_rescaler
from bigexp.optim.twin import ExactTwin

__all__ = ["twin_for_model", "attach_deepspeed", "masters_are_sharded", "grad_cosines", "GradCosAudit", "unwrap",
           "GRAD_COS_THRESHOLD"]

# |cos(g, w)| above which an invariant group is reported. Measured in float32 (tests/test_dropin.py's net on 8x8
# noise, batch 16; fmnist_resnet and resnet18 per set, batch 8, first steps): invariant groups <= 3.7e-5 with BN's
# default eps 1e-5 (<= 1.5e-7 with eps 1e-14: that much is round-off, the rest is eps making the loss slightly
# scale dependent), fmnist_resnet / resnet18 sets <= 3.2e-6; a group holding a weight that reaches the output
# without a norm: 3e-2..0.4. 1e-3 sits between them with ~30x margin each way.
GRAD_COS_THRESHOLD = 1e-3


def unwrap(model: nn.Module) -> nn.Module:
    """The bare module inside DDP / DataParallel / a DeepSpeed engine (all keep it as `.module`)."""
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def twin_for_model(cls, model: nn.Module, example_input: torch.Tensor, *, lr: float, momentum: float = 0.0,
              weight_decay: float = 0.0, renorm_every: Optional[int] = 100, renorm_band: Optional[float] = 16.0,
              plain_weight_decay: Optional[float] = None, granularity: str = "joint", tol: float = 1e-3,
              check=True, audit_every: Optional[int] = 100, audit_threshold: float = GRAD_COS_THRESHOLD,
              norm_reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
              foreach: bool = True, twin: str = "native"):
    """The exact exponential-LR twin of `torch.optim.SGD(model.parameters(), lr, momentum, weight_decay=...)`:
    an instance of `cls` (ExpSGD; it is passed in because `ExpSGD.for_model` is the public entry and this module
    must not import expsgd back).

    model: the bare module or a DDP/DeepSpeed wrapper (unwrapped). example_input: one batch (>= 4 for BatchNorm),
    moved to the model's device and dtype, used by the numeric invariance check (train mode; weights, buffers and
    modes are restored). lr, momentum (heavy-ball, [0, 1)), weight_decay (>= 0): SGD's. plain_weight_decay: the
    weight decay of the non-invariant parameters (default: weight_decay, which is what SGD applies to them).
    renorm_every / renorm_band / norm_reduce / foreach: `ExpSGD`'s. granularity, tol, check: `param_groups`'.
    audit_every: install a `GradCosAudit` run before every audit_every-th step (None: none). twin: "native" (eps
    and BatchNorm's running statistics as they are: train mode equal up to eps) or "exact" (an `ExactTwin` attached:
    eps and running statistics follow the weights' scale, so eval mode is SGD's function too; `opt.exact_twin`).

    Returns the optimizer with `invariance_report` (which parameter went where, and why), `group_names` and
    `grad_audit` (or None) attached. Frozen parameters are in no group (SGD never moves them either).
    """
    if twin not in ("native", "exact"):
        raise ValueError(f"twin={twin!r}: expected 'native' or 'exact'")
    bare = unwrap(model)
    groups, report = param_groups(bare, example_input, lr=lr, weight_decay=weight_decay,
                                  plain_weight_decay=plain_weight_decay, granularity=granularity, tol=tol,
                                  check=check)
    # DeepSpeed silently drops empty groups, which would shift the group indices on_renorm receives.
    groups = [g for g in groups if len(g["params"]) > 0]
    exact = ExactTwin(bare, report, groups) if twin == "exact" else None
    # the exact twin moves the running stats at every scale change, renormalisations included: no second rescaler
    on_renorm = exact.on_renorm if exact is not None else running_stats_rescaler(bare, report, groups)
    opt = cls(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, renorm_every=renorm_every,
                 renorm_band=renorm_band, norm_reduce=norm_reduce, on_renorm=on_renorm, foreach=foreach)
    opt.exact_twin = exact.attach(opt) if exact is not None else None
    opt.invariance_report = report
    opt.group_names = [g["name"] for g in groups]
    opt.grad_audit = None
    if audit_every is not None:
        opt.grad_audit = GradCosAudit(every=audit_every, threshold=audit_threshold)
        opt.register_step_pre_hook(opt.grad_audit)
    return opt


# ---------------------------------------------------------------------------------------------- DeepSpeed

def masters_are_sharded(engine) -> bool:
    """True when the client optimizer's params are flat 1-D shards of the masters (ZeRO 1, BF16_Optimizer).

    Then a group's norm needs the sum of squares from every data-parallel rank.
    """
    # deepspeed is imported only once an engine exists: importing it costs seconds (CLI start, config errors).
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    return isinstance(engine.optimizer, (BF16_Optimizer, DeepSpeedZeroOptimizer))


def _all_reduce_sum(group) -> Callable[[torch.Tensor], torch.Tensor]:
    def reduce(t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t, group=group)   # float64 sums of squares: gloo and NCCL both reduce float64
        return t
    return reduce


def attach_deepspeed(engine, optimizer: torch.optim.Optimizer,
                     reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> bool:
    """Wire ExpSGD into an engine from `deepspeed.initialize(model=..., optimizer=optimizer, ...)`; call it once,
    right after initialize, on every rank. When the masters are sharded, the group norms (renormalisation,
    the audit) are summed across the data-parallel ranks: `reduce` (a SUM all-reduce of a float64 vector,
    in place or returned) or, by default, torch.distributed over the engine's data-parallel group.
    Returns whether the masters are sharded. A torch SGD baseline passes through untouched."""
    sharded = masters_are_sharded(engine)
    if sharded and hasattr(optimizer, "norm_reduce"):   # ExpSGD; torch SGD has no group norms
        optimizer.norm_reduce = reduce or _all_reduce_sum(getattr(engine, "data_parallel_group", None))
    return sharded


# ---------------------------------------------------------------------------------------------- audit

def _dot(a: list, b: list) -> torch.Tensor:
    # float64 per tensor: the dot of an orthogonal pair cancels to ~1e-6 of its terms; fp32 sums would add
    # round-off of that size on ResNet-50's 25M weights
    return torch.stack([torch.dot(x.detach().reshape(-1).double(), y.detach().reshape(-1).double())
                        for x, y in zip(a, b)]).sum()


def grad_cosines(groups: list, norm_reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> list:
    """|cos(g, w)| of each param group (total over its tensors; NaN where it has no gradient or a zero norm).

    <g, w>, |g|^2 and |w|^2 of every group go through ONE `norm_reduce` (a SUM across ranks when the tensors
    are shards), so the value is that of the whole group on every rank; every rank must call it alike.
    """
    rows, device = [], None
    for g in groups:
        ps = [p for p in g["params"] if p.grad is not None]
        if not ps:
            rows.append(None)
            continue
        device = ps[0].device
        gs = [p.grad for p in ps]
        rows.append(torch.stack([_dot(gs, ps), _dot(gs, gs), _dot(ps, ps)]))
    if device is None:
        return [math.nan] * len(groups)
    zero = torch.zeros(3, dtype=torch.float64, device=device)
    vec = torch.stack([r.to(device) if r is not None else zero for r in rows])
    if norm_reduce is not None:
        vec = norm_reduce(vec.reshape(-1)).reshape(-1, 3)
    out = []
    for r, (gw, gg, ww) in zip(rows, vec.tolist()):
        ok = r is not None and gg > 0 and ww > 0 and math.isfinite(gw)
        out.append(abs(gw) / math.sqrt(gg * ww) if ok else math.nan)
    return out


class GradCosAudit:
    """A step pre-hook (`optimizer.register_step_pre_hook`) measuring |cos(g, w)| of every scale-invariant
    group before every `every`-th step, on the gradients that step will use (after GradScaler's unscale, on the
    masters under DeepSpeed). Warns once per group whose value exceeds `threshold`. `stats()` gives the latest
    values as `opt/<group>/grad_cos` for a logger. Collective when the optimizer's norm_reduce is."""

    def __init__(self, every: int = 100, threshold: float = GRAD_COS_THRESHOLD):
        if not (int(every) == every and every > 0):
            raise ValueError(f"every: must be a positive integer, got {every!r}")
        if not threshold > 0:
            raise ValueError(f"threshold: must be > 0, got {threshold!r}")
        self.every, self.threshold = int(every), float(threshold)
        self.calls = 0
        self.latest: dict = {}      # group name -> |cos|
        self.warned: set = set()

    def __call__(self, optimizer, args=(), kwargs=None) -> None:
        self.calls += 1
        if (self.calls - 1) % self.every:
            return
        groups = [g for g in optimizer.param_groups if g.get("scale_invariant", False)]
        if not groups:
            return
        cos = grad_cosines(groups, getattr(optimizer, "norm_reduce", None))
        for g, c in zip(groups, cos):
            name = g.get("name", f"group{g.get('exp_index')}")
            self.latest[name] = c
            if c > self.threshold and name not in self.warned:
                self.warned.add(name)
                warnings.warn(f"param group {name!r} is treated as scale invariant but |cos(grad, weight)| = "
                              f"{c:.2e} > {self.threshold:g} (invariant groups measure <= 4e-5): its loss "
                              "depends on the weights' scale, so the exponential-LR twin is not equivalent "
                              "for it; see opt.invariance_report", RuntimeWarning, stacklevel=2)

    def stats(self) -> dict:
        return {f"opt/{name}/grad_cos": c for name, c in self.latest.items()}
