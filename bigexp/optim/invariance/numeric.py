"""Numeric check: scale each set by c and confirm that the train-mode output does not move.

Each set is scaled by c (default 3.7) and the train-mode output (batch statistics) compared with the unscaled
one; a graph-invariant set whose relative change exceeds `tol` is demoted to plain. Weights, buffers (running
stats, counters) and train/eval flags are restored exactly afterwards.

The one thing that breaks invariance is the norm layers' eps: BN(c x; eps) = BN(x; eps / c^2) exactly. Its effect
on the output is ~ eps / (2 var) at the norm, times however much the network downstream amplifies it (a
ResNet-50 at init amplifies ~20x: gaps near 1e-3 at tol 1e-3 on a tiny batch). A check that mixed that in would
demote sets at random, so the deciding check compares f(c W; eps * c^(2d)) with f(W; eps) at the absorbing norm
modules, an identity in exact arithmetic: what is left is round-off, or a wrong graph claim. The raw gap
f(c W; eps) vs f(W; eps) is measured too (`eps_gap`; per set when asked, always for all sets at once).
"""
from __future__ import annotations

import copy
import math
from typing import Optional

import torch
import torch.nn as nn

from bigexp.optim.invariance.report import ParamSet


def _flat_tensors(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _flat_tensors(o)]
    return []


class Probe:
    """Runs train-mode forwards with a fixed RNG state and restores buffers after each one."""

    def __init__(self, model: nn.Module, x):
        self.model, self.x = model, x
        self.buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
        self.modes = {n: mod.training for n, mod in model.named_modules()}

    def forward(self) -> torch.Tensor:
        m = self.model
        devices = [self.x.device.index or 0] if self.x.device.type == "cuda" else []
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=devices):
                torch.manual_seed(12345)   # dropout & co. draw the same masks in every probe
                m.train()
                out = _flat_tensors(m(self.x))
        except Exception as e:  # noqa: BLE001 - re-raised with context
            raise RuntimeError(f"invariance check: the train-mode forward on the example input failed ({e}); "
                               "BatchNorm needs a batch of at least 2 (4 or more is safer)") from e
        finally:
            self.restore()
        if not out:
            raise RuntimeError("invariance check: the model returned no tensors")
        return torch.cat([t.detach().reshape(-1).double() for t in out])

    def restore(self):
        bufs = dict(self.model.named_buffers())
        with torch.no_grad():
            for n, b in self.buffers.items():
                bufs[n].copy_(b)
        for n, mod in self.model.named_modules():
            mod.training = self.modes[n]

    def rel_change(self, base: torch.Tensor, scaled: list, eps_factor: Optional[dict] = None) -> float:
        """Relative output change when each (param, c) in `scaled` is multiplied by its c and the norm modules
        in eps_factor (module -> factor) have their eps multiplied by that factor."""
        params = [p for p, _ in scaled]
        saved = [p.detach().clone() for p in params]
        eps_factor = {m: f for m, f in (eps_factor or {}).items() if getattr(m, "eps", None) is not None}
        saved_eps = {m: m.eps for m in eps_factor}
        try:
            with torch.no_grad():
                for p, c in scaled:
                    p.mul_(c)
            for m, f in eps_factor.items():
                m.eps = m.eps * f
            y = self.forward()
        finally:
            with torch.no_grad():
                for p, s in zip(params, saved):
                    p.copy_(s)
            for m, e in saved_eps.items():
                m.eps = e
        denom = base.norm().item()
        diff = (y - base).norm().item()
        if not math.isfinite(diff):
            return math.inf
        return diff / denom if denom > 0 else (0.0 if diff == 0 else math.inf)



class _Checker:
    """The example batch, the unscaled output and the model being probed (a float32 copy of a bf16/fp16 one)."""

    def __init__(self, model: nn.Module, example_input: torch.Tensor, sets: list):
        # bf16/fp16 round-off (~1e-2) would swamp tol: check a float32 copy instead (same names, same graph)
        low = any(p.is_floating_point() and p.dtype in (torch.float16, torch.bfloat16) for p in model.parameters())
        self.model = copy.deepcopy(model).float() if low else model
        self.sets = sets
        self.params = dict(self.model.named_parameters())
        p0 = next(iter(self.params.values()), None)
        x = example_input.to(device=p0.device if p0 is not None else example_input.device)
        if p0 is not None and x.is_floating_point():
            x = x.to(dtype=p0.dtype)
        self.probe = Probe(self.model, x)
        self.base = self.probe.forward()

    def change(self, scales: dict, compensate: bool = True) -> float:
        """scales: set index -> c. Compensated: each absorbing norm module's eps times prod c^(2 degree)."""
        factor: dict = {}
        for si, c in scales.items():
            for u in (self.sets[si].norms if compensate else []):
                if u.module:
                    mod = self.model.get_submodule(u.name)
                    factor[mod] = factor.get(mod, 1.0) * c ** (2 * u.degree)
        scaled = [(self.params[n], c) for si, c in scales.items() for n in self.sets[si].params]
        return self.probe.rel_change(self.base, scaled, factor)

    def grouped(self, idx: list, scale: float, tol: float) -> None:
        """One forward for the whole batch of sets, each with its own c in (scale, scale^2); split in
        halves only when it fails, so a failing set is still found and measured alone."""
        if len(idx) == 1:
            self.sets[idx[0]].rel_change = self.change({idx[0]: scale})
            return
        cs = {si: scale ** (1 + k / len(idx)) for k, si in enumerate(idx)}
        rc = self.change(cs)
        if rc <= tol:
            for si in idx:
                self.sets[si].rel_change = rc
        else:
            self.grouped(idx[: len(idx) // 2], scale, tol)
            self.grouped(idx[len(idx) // 2:], scale, tol)


def _settle(checker: _Checker, s: ParamSet, scale: float, tol: float, eps_gap: bool) -> None:
    """Measure set `s` (unless its group already did) and demote it when the output moved beyond tol."""
    if s.rel_change is None:
        s.rel_change = checker.change({s.index: scale})
    if eps_gap and s.invariant:
        s.eps_gap = checker.change({s.index: scale}, compensate=False)
    if s.invariant and not s.rel_change <= tol:
        s.invariant = False
        s.reason = (f"numeric check failed: output changed by {s.rel_change:.2e} > tol {tol:g} when scaled "
                    f"by {scale}, although the graph says: {s.reason}")
        s.norms = []
    elif not s.invariant and s.rel_change <= tol:
        s.reason += f" (numerically unchanged here, {s.rel_change:.1e}, but the graph cannot prove it)"


def check_sets(model: nn.Module, example_input: Optional[torch.Tensor], sets: list, *, tol: float,
               scale: float, check, eps_gap: bool) -> tuple[Optional[float], Optional[float]]:
    """Confirm every set numerically, in place: each set gets its rel_change (and eps_gap when asked); a
    graph-invariant set that moved the output beyond tol is demoted to plain. check: True or "grouped" (see
    `find_scale_invariant`). Returns (union_rel_change, union_eps_gap) of all invariant sets scaled at once
    (None, None when there are none)."""
    if example_input is None:
        raise ValueError("example_input: needed for the numeric check (or pass check=False)")
    checker = _Checker(model, example_input, sets)
    candidates = [s.index for s in sets if s.invariant]
    if check == "grouped" and candidates:
        checker.grouped(candidates, scale, tol)
    for s in sets:
        _settle(checker, s, scale, tol, eps_gap)
    inv = {s.index: scale for s in sets if s.invariant}
    if not inv:
        return None, None
    return checker.change(inv), checker.change(inv, compensate=False)
