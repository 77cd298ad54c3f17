"""From the report to the optimizer: ExpSGD's param groups, the BatchNorm running-stats hook for renorms, and which
norm layers absorb which groups at which degree (`norm_degrees`, for the exact twin `bigexp.optim.twin`)."""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn

from bigexp.optim.invariance.find import find_scale_invariant
from bigexp.optim.invariance.report import InvarianceReport


def param_groups(model: nn.Module, example_input: Optional[torch.Tensor], *, lr: float, weight_decay: float,
                 plain_weight_decay: Optional[float] = None, granularity: str = "joint", tol: float = 1e-3,
                 check=True):
    """Optimizer param groups for ExpSGD, and the report they came from.

    granularity "joint": one group `scale_invariant=True` holding every invariant set (scaling each invariant set
    by the same c leaves the loss unchanged, so the union is invariant too); "per_set": one such group per set.
    Everything else that trains (norm affine, biases of plain layers, the classifier, ...) goes into ONE group
    `scale_invariant=False`, name "plain", with weight_decay = plain_weight_decay (default: weight_decay).
    Invariant groups carry weight_decay = the base lambda: ExpSGD turns it into the exponential LR growth instead
    of decaying the weights. Frozen parameters appear in no group. Each group dict has params, lr, weight_decay,
    scale_invariant and name. tol and check are passed to `find_scale_invariant`.
    """
    if granularity not in ("joint", "per_set"):
        raise ValueError(f"granularity: must be 'joint' or 'per_set', got {granularity!r}")
    if not lr > 0:
        raise ValueError(f"lr: must be > 0, got {lr!r}")
    if weight_decay < 0 or (plain_weight_decay is not None and plain_weight_decay < 0):
        raise ValueError("weight_decay / plain_weight_decay: must be >= 0")
    report = find_scale_invariant(model, example_input, tol=tol, check=check)
    params = dict(model.named_parameters())
    groups = []
    inv_sets = report.invariant_sets
    if granularity == "joint" and inv_sets:
        names = [e.name for e in report.entries if e.status == "invariant"]
        groups.append({"params": [params[n] for n in names], "lr": lr, "weight_decay": weight_decay,
                       "scale_invariant": True, "name": "scale_invariant"})
    elif granularity == "per_set":
        for s in inv_sets:
            groups.append({"params": [params[n] for n in s.params], "lr": lr, "weight_decay": weight_decay,
                           "scale_invariant": True, "name": f"scale_invariant/{s.name}"})
    plain = [params[n] for n in report.names("plain")]
    if plain:
        groups.append({"params": plain, "lr": lr,
                       "weight_decay": weight_decay if plain_weight_decay is None else plain_weight_decay,
                       "scale_invariant": False, "name": "plain"})
    return groups, report


def _group_sets(gi: int, g: dict, names: set, entry: dict, report: InvarianceReport) -> set:
    """Indices of the invariant sets group `gi` holds; ValueError unless it holds only whole invariant sets."""
    set_ids = set()
    for n in names:
        e = entry.get(n)
        if e is None or e.status != "invariant":
            raise ValueError(f"groups[{gi}] ({g.get('name')}): parameter {n} is not scale invariant in the report")
        set_ids.add(e.set_index)
    for si in set_ids:
        missing = set(report.sets[si].params) - names
        if missing:
            raise ValueError(f"groups[{gi}] ({g.get('name')}): holds part of invariant set {si} but not "
                             f"{sorted(missing)}; a group must hold whole sets")
    return set_ids


def _stats_plan(set_ids: set, report: InvarianceReport) -> list:
    """[(running_mean name or None, running_var name or None, degree)] of every BatchNorm absorbing these sets; a
    norm absorbing several of them gets the sum of their degrees (the group's weights are all divided by c).
    Names, not tensors: see `running_stats_rescaler` for why the buffers are looked up when the hook runs."""
    degree: dict = {}
    for si in sorted(set_ids):
        for u in report.sets[si].norms:
            if u.running_mean is None and u.running_var is None:
                continue
            key = (u.running_mean, u.running_var)
            degree[key] = degree.get(key, 0) + u.degree
    return [(rm, rv, d) for (rm, rv), d in degree.items()]


def norm_degrees(model: nn.Module, report: InvarianceReport, groups) -> dict:
    """{norm name: (NormUse, {group index: degree})} for every norm layer absorbing an invariant group: scaling
    group g's weights by c multiplies that norm's input by c**degree (a norm absorbing several sets of one group
    gets the sum of their degrees, as in `_stats_plan`). groups: as for `running_stats_rescaler` (the index is the
    position, ExpSGD's exp_index). Each group must hold whole sets; plain groups contribute nothing."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    entry = {e.name: e for e in report.entries}
    out: dict = {}
    for gi, g in enumerate(groups):
        if not g.get("scale_invariant", False):
            continue
        names = {name_of[id(p)] for p in g["params"]}
        for si in sorted(_group_sets(gi, g, names, entry, report)):
            for u in report.sets[si].norms:
                use, deg = out.setdefault(u.name, (u, {}))
                deg[gi] = deg.get(gi, 0) + u.degree
    return out


def running_stats_rescaler(model: nn.Module, report: InvarianceReport, groups) -> Callable[[int, float], None]:
    """The optimizer's `on_renorm(group_index, c)` hook: after the weights of invariant group `group_index` were
    divided by c (> 0), divide running_mean by c**d and running_var by c**(2d) of every BatchNorm that absorbs the
    group (d: the degree of that norm's input in the group, 1 for a conv feeding it directly), so that eval-mode
    outputs are unchanged up to BN's eps. GroupNorm/LayerNorm keep no running statistics and need nothing.

    groups: the list returned by `param_groups` (or the optimizer's param_groups, same order). A group must hold
    whole sets of the report; plain groups get a no-op. The buffers are found by qualified name on `model` each
    time the hook runs, so it stays right after the model moves device or dtype (pass the bare module: a DeepSpeed
    engine's or DDP's `.module` is the same object).
    """
    name_of = {id(p): n for n, p in model.named_parameters()}
    entry = {e.name: e for e in report.entries}
    plans = []
    for gi, g in enumerate(groups):
        if not g.get("scale_invariant", False):
            plans.append([])
            continue
        names = {name_of[id(p)] for p in g["params"]}
        plans.append(_stats_plan(_group_sets(gi, g, names, entry, report), report))
    missing = {n for plan in plans for rm, rv, _ in plan for n in (rm, rv) if n} - dict(model.named_buffers()).keys()
    if missing:
        raise ValueError(f"running_stats_rescaler: the model has no buffers {sorted(missing)} named in the report")

    def rescale(group_index: int, c: float) -> None:
        if not c > 0:
            raise ValueError(f"running_stats_rescaler: c must be > 0, got {c!r}")
        # Looked up now, on the live model: Module.to() / .cuda() / deepspeed.initialize REPLACE buffer tensors
        # (parameters keep their identity), so references taken at construction would be dead copies after the
        # model moved to the GPU, and every renormalisation would rescale those instead (issue 17, bug 2).
        buffers = dict(model.named_buffers())
        with torch.no_grad():
            for rm, rv, d in plans[group_index]:
                if rm is not None:
                    buffers[rm].div_(c ** d)
                if rv is not None:
                    buffers[rv].div_(c ** (2 * d))

    return rescale
