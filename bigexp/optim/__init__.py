"""Optimizers and schedules: the exponential-LR equivalence (expmath), ExpSGD, scale-invariance detection, LR schedules.

    from bigexp.optim import ExpSGD, find_scale_invariant, param_groups, running_stats_rescaler
    groups, report = param_groups(model, batch, lr=0.1, weight_decay=5e-4)   # runs find_scale_invariant
    opt = ExpSGD(groups, lr=0.1, momentum=0.9, weight_decay=5e-4,
                 on_renorm=running_stats_rescaler(model, report, groups))
    opt = ExpSGD.for_model(model, batch, lr=0.1, momentum=0.9, weight_decay=5e-4)   # the same, in one line
    twin = ExactTwin(model, report, groups)                # optim.twin: exact (eps > 0 and eval mode too):
    opt = ExpSGD(groups, ..., on_renorm=twin.on_renorm); twin.attach(opt)

The pure math (expmath: numpy only) and the schedules (math only) are imported here directly. ExpSGD and the
invariance detector need torch, so they are imported on first use (module `__getattr__`): bigexp.config checks
configs with expmath's existence rule, and importing it must not import torch (`bigexp config` takes ~0.2 s;
torch alone 4-7 s on a 2-core box). The TYPE_CHECKING block below names their real homes for type checkers
and go-to-definition; tests/test_public_api.py checks that it and `_LAZY` agree.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from bigexp.optim.expmath import (alpha, constant_exp_lr, effective_lr, equivalent_log_schedule, equivalent_schedule,
                                  exp_form_bound, exp_form_exists, renorm_factor, texp_log_schedule, texp_schedule)
from bigexp.optim.schedules import (BaseSchedule, ConstantSchedule, CosineSchedule, LinearSchedule, ParamGroupScheduler,
                                    StepSchedule, build_schedule, scheduler_factory)

if TYPE_CHECKING:
    from bigexp.optim.dropin import GradCosAudit, attach_deepspeed, grad_cosines
    from bigexp.optim.expsgd import ExpSGD
    from bigexp.optim.invariance import InvarianceReport, find_scale_invariant, param_groups, running_stats_rescaler
    from bigexp.optim.twin import ExactTwin

# name -> module, for the torch-backed names (see the module docstring for why they are lazy)
_LAZY = {
    "ExpSGD": "bigexp.optim.expsgd",
    "attach_deepspeed": "bigexp.optim.dropin",
    "grad_cosines": "bigexp.optim.dropin",
    "GradCosAudit": "bigexp.optim.dropin",
    "InvarianceReport": "bigexp.optim.invariance",
    "find_scale_invariant": "bigexp.optim.invariance",
    "param_groups": "bigexp.optim.invariance",
    "running_stats_rescaler": "bigexp.optim.invariance",
    "ExactTwin": "bigexp.optim.twin",
}

__all__ = [
    # optimizer and its param groups
    "ExpSGD", "find_scale_invariant", "param_groups", "running_stats_rescaler", "InvarianceReport",
    # eps and BatchNorm running stats following the weights' scale (optim.twin: exact)
    "ExactTwin",
    # dropping ExpSGD into another script (ExpSGD.for_model, then attach_deepspeed under DeepSpeed)
    "attach_deepspeed", "grad_cosines", "GradCosAudit",
    # the equivalence as numbers
    "alpha", "effective_lr", "exp_form_bound", "exp_form_exists", "constant_exp_lr", "equivalent_schedule",
    "equivalent_log_schedule", "texp_schedule", "texp_log_schedule", "renorm_factor",
    # base schedules and the scheduler that writes them into param groups
    "BaseSchedule", "ConstantSchedule", "StepSchedule", "CosineSchedule", "LinearSchedule", "build_schedule",
    "ParamGroupScheduler", "scheduler_factory",
]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip __getattr__
        return value
    raise AttributeError(f"module 'bigexp.optim' has no attribute {name!r}")


def __dir__() -> list:
    return sorted(set(globals()) | set(_LAZY))
