"""`build_optimizer`: the two arms from one config section.

Both arms get the SAME param groups (invariant weights with weight decay λ, everything else in a plain group with
`plain_weight_decay`), so the baseline (torch SGD) and the exp-LR arm (ExpSGD) differ in the optimizer class only:
that is what makes them comparable and, on the invariant groups, exactly equivalent.

optim.twin = "exact" (expsgd only) also installs an `ExactTwin` (bigexp.optim.twin): the norms' eps and BatchNorm's
running statistics follow the weights' scale, so the equivalence holds with eps > 0 and in eval mode too; it replaces
the renorm-only `running_stats_rescaler`. The sgd arm is the same either way.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from bigexp.config.schema import Config
from bigexp.optim.expmath import effective_lr
from bigexp.optim.expsgd import ExpSGD
from bigexp.optim.invariance import param_groups, running_stats_rescaler
from bigexp.optim.twin import ExactTwin


@dataclass
class BuiltOptimizer:
    optimizer: torch.optim.Optimizer
    report: object                      # bigexp.optim.invariance.InvarianceReport
    on_renorm: Optional[Callable[[int, float], None]]
    base_lr: float
    group_names: list
    twin: Optional[ExactTwin] = None    # optim.twin = "exact" on the expsgd arm: already attached to `optimizer`


def config_lr(cfg: Config) -> float:
    """optim.lr after linear batch scaling, the η the math uses (`expmath.effective_lr` of the config's numbers)."""
    return effective_lr(cfg.optim.lr, cfg.data.batch_size, cfg.optim.lr_reference_batch)


def build_optimizer(cfg: Config, model: torch.nn.Module, example_input: torch.Tensor,
                    fused: bool = False) -> BuiltOptimizer:
    """The arm `cfg.optim.optimizer` names, over param groups found by `param_groups` (see the module docstring).

    fused: torch's fused SGD kernel for either arm (else the foreach kernels)."""
    oc = cfg.optim
    lr = config_lr(cfg)
    groups, report = param_groups(model, example_input, lr=lr, weight_decay=oc.weight_decay,
                                  plain_weight_decay=oc.plain_weight_decay, tol=oc.invariance_check_tol)
    # DeepSpeed silently drops empty groups, which would shift the group indices on_renorm receives.
    groups = [g for g in groups if len(g["params"]) > 0]
    names = [g.get("name", f"group{i}") for i, g in enumerate(groups)]
    if oc.optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=lr, momentum=oc.momentum, weight_decay=oc.weight_decay,
                              nesterov=oc.nesterov, foreach=not fused, fused=fused or None)
        on_renorm = None
        twin = None
    else:
        # exact: the twin's hook moves the running stats at every scale change, renormalisations included (the
        # renorm-only rescaler would count those twice)
        twin = ExactTwin(model, report, groups) if oc.twin == "exact" else None
        on_renorm = twin.on_renorm if twin is not None else running_stats_rescaler(model, report, groups)
        opt = ExpSGD(groups, lr=lr, momentum=oc.momentum, weight_decay=oc.weight_decay, nesterov=oc.nesterov,
                     renorm_every=oc.renorm_every, renorm_band=oc.renorm_band, on_renorm=on_renorm, fused=fused)
        if twin is not None:
            twin.attach(opt)
    return BuiltOptimizer(optimizer=opt, report=report, on_renorm=on_renorm, base_lr=lr, group_names=names,
                          twin=twin)


def group_stats(optimizer: torch.optim.Optimizer, group_names: list,
                norm_reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> dict:
    """Per-group scalars for logging, for either arm: base/applied LR, weight norm, and the exp-LR bookkeeping.

    norm_reduce maps the float64 vector of per-group sums of squares of this rank's params to the global sums
    (a SUM all-reduce when the params are ZeRO shards; default: `optimizer.norm_reduce`, which the engine sets
    on either arm when masters are sharded, else none): both arms then log the norm of the whole group, not
    rank 0's shard. A collective then: every rank calls this (the training loop does).
    """
    out = {}
    if hasattr(optimizer, "group_stats"):
        for name, st in zip(group_names, optimizer.group_stats()):
            for k, v in st.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    out[f"opt/{name}/{k}"] = float(v)
        return out
    reduce = norm_reduce if norm_reduce is not None else getattr(optimizer, "norm_reduce", None)
    # on the params' device: an NCCL all-reduce needs the vector there
    device = next((p.device for g in optimizer.param_groups for p in g["params"]), torch.device("cpu"))
    with torch.no_grad():
        sq = torch.stack([sum((p.detach().double().pow(2).sum() for p in g["params"]),
                              torch.zeros((), dtype=torch.float64, device=device)) for g in optimizer.param_groups])
        if reduce is not None:
            sq = reduce(sq)
    for name, g, s in zip(group_names, optimizer.param_groups, sq.tolist()):  # one device->host read
        out[f"opt/{name}/base_lr"] = float(g["lr"])
        out[f"opt/{name}/applied_lr"] = float(g["lr"])
        out[f"opt/{name}/weight_norm"] = s ** 0.5
        if s > 0:
            out[f"opt/{name}/effective_lr"] = float(g["lr"]) / s
    return out
