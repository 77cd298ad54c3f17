"""The exact twin (`optim.twin: exact`): ExpSGD with the norm layers' eps, and BatchNorm's running statistics, moved
with the weights' scale, so that the twin computes the SGD + weight-decay baseline's function with eps > 0 too.

The math. ExpSGD's invariant group g carries A_g (in its group dict: A = 2**exp_log2_A * exp(exp_log_A +
exp_log_A_lo); renormalising by c multiplies it by c) such that its weights are w_t / A_t, w_t the baseline's. A norm
absorbing sets of degree d_g in group g therefore sees its input scaled by S = prod_g A_g**(-d_g), and

    BN(S x; eps * S**2) = BN(x; eps)          (GroupNorm, LayerNorm alike)

so after every optimizer step each such norm gets eps = eps0 * S**2 (eps0: its eps when the twin was built), and a
BatchNorm's running_mean / running_var are multiplied by S_new/S_old and (S_new/S_old)**2: between steps they are S
and S**2 times the baseline's, the EMA averages what the baseline's averages, and eval mode equals the baseline's.
In exact mode this replaces `running_stats_rescaler` (a renormalisation is just part of the scale change).

Exactness of renormalisation. S is carried as 2**-T * exp(-U), T an integer (sum of d_g * exp_log2_A), U a float
(sum of d_g * (exp_log_A + exp_log_A_lo)): a renormalisation changes T only, so eps changes by an exact power of two
(`compensated_eps`, one ldexp) and the running statistics by an exact power of two times the same float factor
(`rescale_factors`). A run renormalised at any steps stays BITWISE the run without renormalisation, scaled by 2**-E,
with eps > 0 (tests/test_twin_exact.py) -- native mode has that only with eps below every variance's ulp.

When it runs. `after_step` is a step post-hook of the optimizer and its on_renorm (renormalize_() outside a step);
it processes the groups present in optimizer.param_groups, keyed by exp_index, remembering the scale it last applied
per group, so DeepSpeed ZeRO's one-group-at-a-time steps and repeated calls are fine (idempotent). A forward
pre-hook on the model adopts the optimizer's A without rescaling anything when it differs from the last applied one:
that happens only after the optimizer state was loaded (a resume), whose running statistics are saved buffers
already in that scale, while eps (an attribute, not saved) must be recomputed before the first forward.

Cost: per step, one host scalar per absorbing norm (A is host bookkeeping: no device sync) and one in-place multiply
of each BatchNorm's two running-stat buffers; per forward, a comparison of a few host scalars per group.
Limits: a functional norm (F.batch_norm, no module holding eps) cannot be compensated and is refused; torch.compile
would recompile for every new eps (a Python float), so engine.compile is refused with it (config.validate); with
DeepSpeed bf16 the running statistics are bf16 and the per-step rescale (~1 - eta*lambda/(1-gamma)) rounds to
bf16's 8 bits, so eval mode matches the baseline only to bf16 rounding (tests/dist/twin_engine.py: eval outputs
9e-3 off, inside bf16's own floor, native 0.18); bf16_autocast keeps them fp32.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from bigexp.errors import ConfigError
from bigexp.optim.invariance.groups import norm_degrees

__all__ = ["ExactTwin", "compensated_eps", "rescale_factors", "group_log_scale", "norm_log_scale"]


# ---------------------------------------------------------------------------------------------- the math

def group_log_scale(g: dict) -> tuple[int, float]:
    """(E, L) of an ExpSGD param group: A = 2**E * exp(L) (its exp_log2_A and exp_log_A + exp_log_A_lo)."""
    return int(g["exp_log2_A"]), g["exp_log_A"] + g["exp_log_A_lo"]


def norm_log_scale(degrees: dict, scales: dict) -> tuple[int, float]:
    """(T, U) with S = prod_g A_g**(-d_g) = 2**-T * exp(-U): T = sum d_g E_g (exact), U = sum d_g L_g.
    degrees: {group index: d_g}; scales: {group index: (E_g, L_g)}."""
    order = sorted(degrees)
    return (sum(degrees[g] * scales[g][0] for g in order),
            math.fsum(degrees[g] * scales[g][1] for g in order))


def compensated_eps(eps0: float, t: int, u: float) -> float:
    """eps0 * S**2 for S = 2**-t * exp(-u): the power-of-two part applied exactly (ldexp), so a renormalisation
    (which changes t only) changes eps by an exact power of two."""
    return math.ldexp(eps0 * math.exp(-2.0 * u), -2 * t)


def rescale_factors(old: tuple[int, float], new: tuple[int, float]) -> tuple[float, float]:
    """(S_new/S_old, (S_new/S_old)**2) from the (T, U) pairs: one float factor exp(U_old - U_new) times an exact
    power of two 2**(T_old - T_new) (squared: f*f times 4**(T_old - T_new))."""
    f, k = math.exp(old[1] - new[1]), old[0] - new[0]
    return math.ldexp(f, k), math.ldexp(f * f, 2 * k)


# ---------------------------------------------------------------------------------------------- the hook object

@dataclass
class _Norm:
    name: str
    kind: str
    module: nn.Module
    eps0: float
    degrees: dict                        # {group index: degree}
    applied: tuple = (0, 0.0)            # (T, U) now in eps and the running statistics


class ExactTwin:
    """Keeps every absorbing norm's eps at eps0 * S**2 and BatchNorm's running stats at S, S**2 times the
    baseline's (see the module docstring).

        groups, report = param_groups(model, batch, lr=..., weight_decay=...)
        twin = ExactTwin(model, report, groups)
        opt = ExpSGD(groups, ..., on_renorm=twin.on_renorm)
        twin.attach(opt)

    model: the bare module (a DDP / DeepSpeed wrapper's `.module`). groups: the list handed to ExpSGD (a group's
    position is its exp_index). ConfigError (naming the layer) for a norm the twin cannot compensate: a functional
    norm, or a module without a float `eps`. Attach to a fresh optimizer (A = 1), or to one whose state and the
    model's buffers were loaded together (the buffers are then taken to be in that state's scale already).
    """

    def __init__(self, model: nn.Module, report, groups):
        self.model = model
        self.norms: list[_Norm] = []
        for name, (use, degrees) in norm_degrees(model, report, groups).items():
            if not use.module:
                raise ConfigError(f"optim.twin = 'exact': the norm {use.describe()} is functional (no module holds "
                                  "its eps), so the exact twin cannot compensate it; make it an nn.Module norm "
                                  "layer or use optim.twin = 'native'")
            module = model.get_submodule(name)
            eps = getattr(module, "eps", None)
            if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps >= 0:
                raise ConfigError(f"optim.twin = 'exact': the norm {use.describe()} has no float eps >= 0 (got "
                                  f"{eps!r}); the exact twin cannot compensate it")
            self.norms.append(_Norm(name, use.kind, module, float(eps), dict(degrees)))
        self.scales: dict = {}           # group index -> (E, L) last applied
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self._handles: list = []

    def attach(self, optimizer: torch.optim.Optimizer) -> "ExactTwin":
        """Install the step post-hook and the model's forward pre-hook; adopt the optimizer's current A."""
        if self.optimizer is not None:
            raise RuntimeError("ExactTwin.attach: already attached")
        present = {g.get("exp_index"): g for g in optimizer.param_groups}
        for n in self.norms:
            for gi in n.degrees:
                g = present.get(gi)
                if g is None or not g.get("exp_scale_invariant", False):
                    raise ValueError(f"ExactTwin.attach: norm {n.name} absorbs param group {gi}, which is not a "
                                     "scale-invariant ExpSGD group of this optimizer")
        self.optimizer = optimizer
        self.adopt()
        self._handles = [optimizer.register_step_post_hook(self.after_step),
                         self.model.register_forward_pre_hook(self._before_forward)]
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self.optimizer = [], None

    def _present(self, optimizer) -> dict:
        return {g["exp_index"]: group_log_scale(g) for g in optimizer.param_groups
                if g.get("exp_scale_invariant", False)}

    @torch.no_grad()
    def after_step(self, optimizer, args=(), kwargs=None) -> None:
        """Move eps and the running stats to the scale of the groups present now (a step post-hook)."""
        self._apply(self._present(optimizer), rescale=True)

    def on_renorm(self, group_index: int, c: float) -> None:
        """ExpSGD's on_renorm: the same update, for a renormalisation outside step() (renormalize_())."""
        if self.optimizer is not None:
            self.after_step(self.optimizer)

    def adopt(self) -> None:
        """Take the optimizer's A as the scale eps and the running stats are in (after a load): eps recomputed,
        nothing rescaled."""
        self._apply(self._present(self.optimizer), rescale=False)

    def _before_forward(self, module, args) -> None:
        # Only a load changes A without after_step; its buffers are saved ones, already in the loaded scale.
        if any(self.scales.get(gi) != s for gi, s in self._present(self.optimizer).items()):
            self.adopt()

    def _apply(self, present: dict, *, rescale: bool) -> None:
        changed = {gi for gi, s in present.items() if self.scales.get(gi) != s}
        if not changed and self.scales:
            return
        scales = {**self.scales, **present}
        for n in self.norms:
            if self.scales and not changed.intersection(n.degrees):
                continue
            new = norm_log_scale(n.degrees, {gi: scales.get(gi, (0, 0.0)) for gi in n.degrees})
            n.module.eps = compensated_eps(n.eps0, *new)
            if rescale and new != n.applied:
                self._rescale_stats(n, rescale_factors(n.applied, new))
            n.applied = new
        self.scales = scales

    @staticmethod
    def _rescale_stats(n: _Norm, factors: tuple[float, float]) -> None:
        # Looked up on the live module each time: Module.to() and deepspeed.initialize replace buffer tensors.
        rm, rv = getattr(n.module, "running_mean", None), getattr(n.module, "running_var", None)
        if rm is not None:
            rm.mul_(factors[0])
        if rv is not None:
            rv.mul_(factors[1])

    def state(self) -> list[dict]:
        """Per norm: name, kind, eps0, eps now, degrees, log2 and log of the scale S applied (for logs, tests)."""
        return [{"name": n.name, "kind": n.kind, "eps0": n.eps0, "eps": n.module.eps, "degrees": dict(n.degrees),
                 "log2_S": -n.applied[0], "log_S": -n.applied[1]} for n in self.norms]
