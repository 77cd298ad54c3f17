"""Theory on the charts: the angular update of each scale-invariant param group, and what theory predicts for it.

Pure math first (plain floats):
    angular_update(dot, sq0, sq1, chord_sq)   Delta_t, the angle between w_t and w_{t+1} (radians)
    equilibrium_angle(eta, lam, gamma)        sqrt(2*eta*lam/(1+gamma)): Wan et al. 2021, "Spherical motion dynamics"
    intrinsic_lr(eta, lam)                    eta*lam: Li, Lyu & Arora 2020, equilibrium after ~1/(eta*lam) steps
then the measurement (`AngleSnapshot`): a copy of every invariant group's weights taken just before an optimizer
step, compared with the weights after it. The angle is scale invariant, so it is the same number for torch SGD with
weight decay and for its ExpSGD twin (whose weights are A_t times larger, and renormalised now and then): that is
the point of the chart.

Cost: only on logging steps (the loop decides), one copy of the invariant weights (what the client optimizer holds:
the fp32 masters, under ZeRO only this rank's shard) between the step and the log line, and one device->host read.
No cheaper exact formulation was used: w_t could be rebuilt from w_{t+1} and the momentum buffer, but only through
the optimizer's own update rule (momentum 0 keeps no buffer, ExpSGD rescales buffers on renormalising, fp16 skips
steps), while the snapshot measures what the step did whatever the optimizer is.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from bigexp.run.metrics import ANGULAR_EQUILIBRIUM, ANGULAR_UPDATE, INTRINSIC_LR, theory_tag


# ---------------------------------------------------------------------------------------------- pure math
def angular_update(dot: float, sq0: float, sq1: float, chord_sq: Optional[float] = None) -> float:
    """The angle (radians, in [0, pi]) between w0 and w1 from <w0, w1>, |w0|^2 and |w1|^2 (sums over the whole
    group); NaN when either norm is zero or a sum is not finite.

    chord_sq = |u0 - u1|^2 with u = w/|w|, summed elementwise: then angles up to pi/2 come from
    2*asin(|u0 - u1|/2), accurate to rounding for tiny angles. From dot alone, arccos(cos) loses them: cos is
    1 - Delta^2/2, so Delta is known to ~sqrt(float64 eps) = 1.5e-8 only (a 1e-9 rad step reads as 0 or 1.5e-8)."""
    if not all(math.isfinite(v) for v in (dot, sq0, sq1)) or sq0 <= 0.0 or sq1 <= 0.0:
        return float("nan")
    if chord_sq is not None and math.isfinite(chord_sq) and 0.0 <= chord_sq <= 2.0:  # <= 90 degrees
        return 2.0 * math.asin(math.sqrt(chord_sq) / 2.0)
    cos = dot / math.sqrt(sq0 * sq1)  # sqrt of the product: sq0, sq1 in range, no overflow of |w0|*|w1| first
    return math.acos(min(1.0, max(-1.0, cos)))  # rounding can push |cos| past 1


def _check_hyper(eta: float, lam: float, gamma: float = 0.0) -> None:
    if not (eta >= 0.0 and math.isfinite(eta)):
        raise ValueError(f"eta (learning rate) must be finite and >= 0, got {eta!r}")
    if not (lam >= 0.0 and math.isfinite(lam)):
        raise ValueError(f"lambda (weight decay) must be finite and >= 0, got {lam!r}")
    if not (0.0 <= gamma < 1.0):
        raise ValueError(f"gamma (momentum) must be in [0, 1), got {gamma!r}")


def equilibrium_angle(eta: float, lam: float, gamma: float) -> float:
    """sqrt(2*eta*lam/(1+gamma)) radians: the angular update per step that SGD with heavy-ball momentum gamma and
    weight decay lam at LR eta settles at on scale-invariant weights (Wan et al. 2021, Theorem 1; the weight norm's
    equilibrium balances the decay's shrinking against the gradient's orthogonal growth)."""
    _check_hyper(eta, lam, gamma)
    return math.sqrt(2.0 * eta * lam / (1.0 + gamma))


def intrinsic_lr(eta: float, lam: float) -> float:
    """eta*lam: the intrinsic LR of Li, Lyu & Arora (NeurIPS 2020); equilibrium is reached after ~1/(eta*lam)
    steps (`equilibrium_steps`), whatever the initial norm."""
    _check_hyper(eta, lam)
    return eta * lam


def equilibrium_steps(eta: float, lam: float) -> float:
    """1/(eta*lam): the number of steps to equilibrium (inf without weight decay)."""
    x = intrinsic_lr(eta, lam)
    return 1.0 / x if x > 0 else math.inf


# ---------------------------------------------------------------------------------------------- measurement
Reduce = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class _Group:
    name: str
    index: int                 # position in optimizer.param_groups
    before: list               # copies of the group's tensors before the step
    eta: float                 # the base schedule's LR, weight decay and momentum of this step
    lam: float
    gamma: float


class AngleSnapshot:
    """The invariant groups' weights just before one optimizer step; `measure` after it gives the theory tags.

    Either arm: the groups flagged scale_invariant, with lr / weight_decay / momentum read from the group at
    snapshot time (the step's own values; ExpSGD keeps the BASE schedule there, so both arms show one prediction).
    Shard-safe: float64 partial sums of this rank's tensors go through `norm_reduce` (the optimizer's, as
    `optim.build.group_stats` uses: a SUM across ranks when params are ZeRO shards; None: whole tensors here)."""

    def __init__(self, optimizer: torch.optim.Optimizer, group_names: list):
        self.groups = [
            _Group(name, i, [p.detach().clone() for p in g["params"]], float(g["lr"]), float(g["weight_decay"]),
                   float(g.get("momentum", 0.0)))
            for i, (name, g) in enumerate(zip(group_names, optimizer.param_groups)) if g.get("scale_invariant")]

    @torch.no_grad()
    def measure(self, optimizer: torch.optim.Optimizer,
                norm_reduce: Optional[Reduce] = None) -> dict:
        """{theory/<group>/angular_update, .../angular_equilibrium, .../intrinsic_lr} for every invariant group.
        A collective when the reduction is one: every rank calls it (the loop's log line does)."""
        if not self.groups:
            return {}
        reduce = norm_reduce if norm_reduce is not None else getattr(optimizer, "norm_reduce", None)
        pairs = [self._pairs(optimizer, g) for g in self.groups]
        device = next((a.device for ps in pairs for a, _ in ps), torch.device("cpu"))
        # Pass 1: <w0,w1>, |w0|^2, |w1|^2 of the whole group. Pass 2 needs the global norms: |u0 - u1|^2.
        sums = _reduced(torch.stack([_dot_and_squares(ps, device) for ps in pairs]), reduce)
        n0, n1 = sums[:, 1].sqrt(), sums[:, 2].sqrt()
        chord = _reduced(torch.stack([_chord_sq(ps, n0[i], n1[i], device) for i, ps in enumerate(pairs)]), reduce)
        values = torch.cat((sums.reshape(-1), chord)).tolist()  # the measurement's one device->host read
        out = {}
        for i, g in enumerate(self.groups):
            dot, sq0, sq1 = values[3 * i: 3 * i + 3]
            out[theory_tag(g.name, ANGULAR_UPDATE)] = angular_update(dot, sq0, sq1, values[3 * len(pairs) + i])
            out[theory_tag(g.name, ANGULAR_EQUILIBRIUM)] = equilibrium_angle(g.eta, g.lam, g.gamma)
            out[theory_tag(g.name, INTRINSIC_LR)] = intrinsic_lr(g.eta, g.lam)
        self.groups = []  # the copies are freed now, not at the next log line
        return out

    @staticmethod
    def _pairs(optimizer: torch.optim.Optimizer, g: _Group) -> list:
        """(w0, w1) per tensor of the group: the snapshot's copy and the tensor the optimizer stepped."""
        after = optimizer.param_groups[g.index]["params"]
        if len(after) != len(g.before) or any(a.shape != b.shape for a, b in zip(g.before, after)):
            raise RuntimeError(f"param group {g.name}: its tensors changed between the snapshot and the step's end")
        return [(a, b.detach()) for a, b in zip(g.before, after)]


# Both passes go tensor by tensor in float64 (products of fp32 or bf16 numbers are exact there), so no more than one
# tensor's float64 copy exists at a time.
def _dot_and_squares(pairs: list, device) -> torch.Tensor:
    acc = torch.zeros(3, dtype=torch.float64, device=device)
    for a, b in pairs:
        a, b = a.double(), b.double()
        acc += torch.stack(((a * b).sum(), a.square().sum(), b.square().sum())).to(device)
    return acc


def _chord_sq(pairs: list, n0: torch.Tensor, n1: torch.Tensor, device) -> torch.Tensor:
    acc = torch.zeros((), dtype=torch.float64, device=device)
    for a, b in pairs:
        acc += (a.double() / n0 - b.double() / n1).square().sum().to(device)
    return acc


def _reduced(x: torch.Tensor, reduce: Optional[Reduce]) -> torch.Tensor:
    """The global sums of a per-rank float64 array (any shape: the reduction sees it flat)."""
    return x if reduce is None else reduce(x.reshape(-1)).reshape(x.shape)
