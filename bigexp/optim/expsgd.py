"""ExpSGD: SGD whose scale-invariant groups follow the exact exponential-LR equivalent of SGD with weight decay.

Plain groups (scale_invariant=False) are torch.optim.SGD exactly (the same functional kernel is called).
Scale-invariant groups read group['lr'] / group['weight_decay'] each step as the BASE schedule (eta_t, lambda_t)
and take the step of the equivalent run with no weight decay and LR eta_t/(A_t*A_{t+1}) (see `expmath`), so
the network function equals that of SGD(weight_decay=lambda) at every step, to rounding, while the weights
grow instead of shrinking. Renormalisation divides a group's weights by c (momentum buffers and A_t are
multiplied by c), which keeps the numbers in range.

Lossless renormalisation. c = 2**round(log2(|w|/n0)) is a power of two (`expmath.renorm_factor`), A_t is carried
as 2**E * exp(log_A) with an integer E that renormalisations add to, and the applied LR is ldexp(.., -2E): so
dividing the weights, multiplying the buffers and rescaling the LR are all exact, and a run renormalised at
any steps is BITWISE the run without renormalisation, scaled by 2**-E (barring subnormals), in fp32, bf16 or
float64 (tests/test_expsgd.py::test_renormalisation_is_bitwise_lossless). What is left in a real network is the
norm layers' eps: BN(x/c; eps) = BN(x; c**2 * eps), not BN(x; eps), so with eps > 0 the renormalised run sees a
slightly different eps (relative to var) than the unrenormalised one -- the same gap the exp-LR run itself has
against SGD (its weights are 1/A_t times larger). With eps far below ulp(var) (e.g. 1e-30) it is exactly zero.
The norm lands within a factor sqrt(2) of n0 (not on it), so renorm_band must be >= sqrt(2).

Host syncs. A steady-state step() reads nothing back from the device: group norms are computed (one
device->host read for all groups) only on the steps that may renormalise -- every renorm_every-th step of a
group, and every band_check_every-th step when renorm_band is set -- and by group_stats() for logging.

Everything per group is one scalar computed from the group's TOTAL norm, so it works on flat 1-D shards
(DeepSpeed ZeRO): the per-group sums of squares go through `norm_reduce` (an all-reduce SUM across the
data-parallel group when sharded).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Optional

import torch
from torch.optim.sgd import sgd as _sgd_functional

from . import expmath
from .dropin import twin_for_model

__all__ = ["ExpSGD"]

_EXP_STATE_VERSION = 2
# keys added in version 2, with the value a version-1 state means (its log_A already includes every renorm)
_V2_KEYS = {"log2_A": 0, "last_renorm_log2": 0, "weight_norm_step": None}

# Per-group bookkeeping, stored IN the param-group dict under "exp_<name>" (plain Python scalars): DeepSpeed
# ZeRO steps one group at a time by swapping optimizer.param_groups for [group_i], so anything indexed by
# position would be wrong; the dict itself travels. torch's (and DeepSpeed's) optimizer state_dict saves and
# restores these keys with the group, without aliasing (all values are immutable scalars).
_EXP_DEFAULTS = {
    "index": None,        # the group's position at construction (stable name for messages and on_renorm)
    "scale_invariant": False,
    "step": 0,            # optimizer steps this group has taken
    "q": 0.0,             # q_{t-1} = (r_{t-1} - 1)/eta_{t-1}  (expmath's q form)
    "r": 1.0,             # r_{t-1}
    "log_A": 0.0,         # A_t = 2**log2_A * exp(log_A + log_A_lo): compensated pair, |log_A| <= ln 2
    "log_A_lo": 0.0,
    "log2_A": 0,          # integer part (renormalisations and `expmath.reduce_log_a` add to it, exactly)
    "last_renorm_log2": 0,  # sum of k (c = 2**k) of the renormalisations since the group's last step
    "n0": None,           # group norm before its first step: the renormalisation target
    "lr": None,           # eta of the last step taken
    "applied_lr": None,   # LR applied at the last step taken
    "weight_norm": None,  # group norm after the last step (after any renormalisation), when last computed
    "weight_norm_step": None,  # the exp_step at which weight_norm was computed (None: never)
    "renorm_count": 0,
}


def _get(g: dict) -> dict:
    return {k: g["exp_" + k] for k in _EXP_DEFAULTS}


def _put(g: dict, **values) -> None:
    for k, v in values.items():
        g["exp_" + k] = v


class ExpSGD(torch.optim.Optimizer):
    """SGD + exact exponential LR for scale-invariant param groups.

    Args:
        params: tensors or param-group dicts; a group may set ``scale_invariant=True`` (default False) and
            override lr / momentum / weight_decay / nesterov.
        lr: base LR eta (>= 0). For invariant groups this is eta_t of the base schedule, not what is applied.
        momentum: gamma in [0, 1). weight_decay: lambda >= 0 (invariant groups: the base schedule's lambda_t).
        nesterov: plain groups only (no exact exponential equivalent is implemented); an invariant group
            with nesterov=True raises ValueError naming the group.
        renorm_every: renormalise invariant groups every N of their steps (None: never on a clock).
        renorm_band: also renormalise when a group's norm leaves [n0/band, n0*band] (band >= sqrt(2), since a
            power-of-two renormalisation lands within sqrt(2) of n0; None: never). Checked on the host
            every band_check_every steps of a group (None: renorm_every, or 1 when renorm_every is None):
            each check is a device->host sync. Renormalising is lossless, so when it happens changes nothing
            but the range the numbers stay in.
        norm_reduce: maps a 1-D float64 tensor of per-group sums of squares (local shards) to the global sums;
            identity by default. Called on every step() call (once more on a group's first step) with one
            entry per group in optimizer.param_groups at that moment, so every rank must call step() alike.
        on_renorm: callback(group_index, c) after a group's weights were divided by c (e.g. BN running_mean
            /= c and running_var /= c**2 for the layers that group feeds). group_index is the group's position
            at construction.
        foreach: use the torch._foreach_* kernels (no Python loop over tensors).
        fused: use torch's fused SGD kernel (as torch.optim.SGD(fused=True); devices torch has it for, float
            params only); invariant groups call it with the exponential LR and no weight decay.

    Bookkeeping lives in each group dict under "exp_*" keys, so the ordinary state_dict() round trip
    restores everything; exp_state_dict() holds only those scalars (for checkpoints whose momentum buffers
    are restored by someone else, e.g. DeepSpeed).
    """

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 nesterov: bool = False, renorm_every: Optional[int] = 100, renorm_band: Optional[float] = 16.0,
                 norm_reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                 on_renorm: Optional[Callable[[int, float], Any]] = None, foreach: bool = True,
                 fused: Optional[bool] = None, band_check_every: Optional[int] = None):
        for name, v in (("renorm_every", renorm_every), ("band_check_every", band_check_every)):
            if v is not None and (int(v) != v or v <= 0):
                raise ValueError(f"{name} must be a positive integer or None, got {v!r}")
        if renorm_band is not None and not (renorm_band >= expmath.MIN_RENORM_BAND and math.isfinite(renorm_band)):
            raise ValueError(f"renorm_band must be >= sqrt(2) = {expmath.MIN_RENORM_BAND!r} or None (a power-of-two "
                             f"renormalisation lands within sqrt(2) of n0), got {renorm_band!r}")
        self.renorm_every = None if renorm_every is None else int(renorm_every)
        self.renorm_band = None if renorm_band is None else float(renorm_band)
        self.band_check_every = int(band_check_every or self.renorm_every or 1)
        self.norm_reduce = norm_reduce
        self.on_renorm = on_renorm
        self.fused = bool(fused)
        self.foreach = bool(foreach) and not self.fused
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                        scale_invariant=False)
        super().__init__(params, defaults)
        if self.fused:
            self._check_fused()

    def _check_fused(self) -> None:
        # torch.optim.SGD's own rule: the fused kernel exists for floating params on these device types only
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
        ok = _get_fused_kernels_supported_devices()
        for g in self.param_groups:
            for p in g["params"]:
                if p.device.type not in ok or not torch.is_floating_point(p):
                    raise RuntimeError(f"param group {g['exp_index']}: fused=True needs floating params on one "
                                       f"of {ok}, got {p.dtype} on {p.device}")

    @classmethod
    def for_model(cls, model: torch.nn.Module, example_input: torch.Tensor, **kwargs) -> "ExpSGD":
        """Drop-in for `torch.optim.SGD(model.parameters(), lr=..., momentum=..., weight_decay=...)`: the exact
        exponential-LR twin with invariant groups found, plain groups kept, the BatchNorm hook installed and
        `invariance_report` attached. Keywords: `bigexp.optim.dropin.twin_for_model`."""
        return twin_for_model(cls, model, example_input, **kwargs)

    # ------------------------------------------------------------------------------------------ groups

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        g = self.param_groups[-1]
        for k, v in _EXP_DEFAULTS.items():
            g["exp_" + k] = v
        _put(g, index=len(self.param_groups) - 1, scale_invariant=bool(g["scale_invariant"]))
        self._validate_group(g)

    @staticmethod
    def _validate_group(g: dict) -> None:
        i = g["exp_index"]
        lr, wd, mom = float(g["lr"]), float(g["weight_decay"]), float(g["momentum"])
        if not (lr >= 0.0 and math.isfinite(lr)):
            raise ValueError(f"param group {i}: lr must be finite and >= 0, got {g['lr']!r}")
        if not (wd >= 0.0 and math.isfinite(wd)):
            raise ValueError(f"param group {i}: weight_decay must be finite and >= 0, got {g['weight_decay']!r}")
        if not (0.0 <= mom < 1.0):
            raise ValueError(f"param group {i}: momentum must be in [0, 1), got {g['momentum']!r}")
        if g["nesterov"] and mom <= 0.0:
            raise ValueError(f"param group {i}: nesterov=True requires momentum > 0")
        if g["nesterov"] and g["scale_invariant"]:
            raise ValueError(
                f"param group {i} is scale_invariant and has nesterov=True: the exact exponential-LR "
                "equivalent is implemented for heavy-ball momentum only; use nesterov=False for this group")
        if bool(g["scale_invariant"]) != g["exp_scale_invariant"]:
            raise ValueError(f"param group {i}: scale_invariant changed after construction")

    def _group(self, group_index: int) -> dict:
        for g in self.param_groups:
            if g["exp_index"] == group_index:
                return g
        raise IndexError(f"no param group {group_index}")

    def exp_state(self, group_index: int) -> dict:
        """A copy of one group's bookkeeping (step, q, r, log_A, n0, weight_norm, renorm_count, ...)."""
        return _get(self._group(group_index))

    # ------------------------------------------------------------------------------------------ norms

    def _group_norms(self, groups: list[dict]) -> list[float]:
        """Global L2 norms of the given groups: one foreach reduction per group, one norm_reduce, one sync."""
        sums = []
        device = next((p.device for g in self.param_groups for p in g["params"]), None)
        for g in groups:
            ps = list(g["params"])
            if not ps:
                sums.append(None)
                continue
            low = [p for p in ps if p.dtype in (torch.float16, torch.bfloat16)]
            rest = [p for p in ps if p.dtype not in (torch.float16, torch.bfloat16)]
            parts = []
            # half-precision norms accumulate in fp32: c must be the norm, not a bf16 rounding of it
            if low:
                parts.extend(torch._foreach_norm(low, 2, dtype=torch.float32))
            if rest:
                parts.extend(torch._foreach_norm(rest, 2))
            sums.append(torch.stack([x.to(device=device, dtype=torch.float64) for x in parts]).square().sum())
        if device is None or not groups:
            return [0.0 for _ in groups]
        vec = torch.stack([s.to(device) if s is not None else torch.zeros((), dtype=torch.float64, device=device)
                           for s in sums])
        if self.norm_reduce is not None:
            vec = self.norm_reduce(vec)
        return [math.sqrt(max(x, 0.0)) if math.isfinite(x) else float("nan") for x in vec.tolist()]

    # ------------------------------------------------------------------------------------------ step

    def _collect(self, g: dict):
        params, grads, bufs = [], [], []
        for p in g["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"param group {g['exp_index']}: ExpSGD does not support sparse gradients")
            params.append(p)
            grads.append(p.grad)
            bufs.append(self.state[p].get("momentum_buffer") if g["momentum"] != 0 else None)
        return params, grads, bufs

    def _sgd(self, params, grads, bufs, **kw) -> None:
        _sgd_functional(params, grads, bufs, foreach=self.foreach, fused=self.fused, dampening=0.0, maximize=False,
                        **kw)

    def _applied_lr(self, g: dict, lr: float, wd: float, mom: float) -> float:
        """One step of bookkeeping; returns the LR to apply, eta_t/(A_t*A_{t+1}) = ldexp(.., -2*log2_A)."""
        q, r, hi, lo, applied = expmath.bookkeeping_step(
            g["exp_q"], g["exp_r"], g["exp_log_A"], g["exp_log_A_lo"], lr, wd, mom, step=g["exp_step"])
        try:
            # exact power-of-two scaling: the renormalised run's LR is the unrenormalised run's times 4**-k
            applied = math.ldexp(applied, -2 * g["exp_log2_A"])
        except OverflowError:
            raise OverflowError(
                f"param group {g['exp_index']}: applied LR overflows float64 (log2 A_t = {g['exp_log2_A']}) at "
                f"step {g['exp_step']}: renormalise the weights (renorm_every / renorm_band)") from None
        m, hi, lo = expmath.reduce_log_a(hi, lo)
        _put(g, q=q, r=r, log_A=hi, log_A_lo=lo, log2_A=g["exp_log2_A"] + m)
        return applied

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        groups = list(self.param_groups)  # under DeepSpeed ZeRO: just the one group being stepped
        for g in groups:
            self._validate_group(g)
        first = [g for g in groups if g["scale_invariant"] and g["exp_n0"] is None]
        if first:
            for g, n in zip(first, self._group_norms(first)):
                if not (math.isfinite(n) and n > 0.0):
                    raise ValueError(f"param group {g['exp_index']} is scale_invariant but its weight norm is "
                                     f"{n!r} at its first step; a zero or non-finite group cannot be "
                                     "scale-invariant")
                _put(g, n0=n)

        stepped = []
        for g in groups:
            params, grads, bufs = self._collect(g)
            if not params:
                continue  # like SGD: nothing moves, and the equivalent run skips the step too
            lr, wd, mom = float(g["lr"]), float(g["weight_decay"]), float(g["momentum"])
            if g["scale_invariant"]:
                applied = self._applied_lr(g, lr, wd, mom)
                self._sgd(params, grads, bufs, weight_decay=0.0, momentum=mom, lr=applied, nesterov=False)
            else:
                applied = lr
                self._sgd(params, grads, bufs, weight_decay=wd, momentum=mom, lr=lr, nesterov=bool(g["nesterov"]))
            if mom != 0:
                for p, b in zip(params, bufs):
                    self.state[p]["momentum_buffer"] = b
            _put(g, step=g["exp_step"] + 1, lr=lr, applied_lr=applied, last_renorm_log2=0)
            stepped.append(g)

        # Norms only on steps that may renormalise (a device->host sync); then of ALL groups in view: the vector
        # handed to norm_reduce (a collective when sharded) must have the same length on every rank.
        due = [g for g in stepped if g["scale_invariant"] and self._check_due(g)]
        if due:
            for g, n in zip(groups, self._group_norms(groups)):
                if not any(g is d for d in due):
                    continue
                _put(g, weight_norm=n, weight_norm_step=g["exp_step"])
                if self._renorm_due(g, n):
                    self._renorm(g, n)
        return loss

    def _ticks(self, g: dict) -> bool:
        return self.renorm_every is not None and g["exp_step"] % self.renorm_every == 0

    def _check_due(self, g: dict) -> bool:
        """Whether this step reads the group's norm: a renorm_every tick, or a band check."""
        band = self.renorm_band is not None and g["exp_step"] % self.band_check_every == 0
        return self._ticks(g) or band

    def _renorm_due(self, g: dict, n: float) -> bool:
        if not (math.isfinite(n) and n > 0.0):
            return False  # a diverged group cannot be rescaled meaningfully; the loss will show it
        if self._ticks(g):
            return True
        if self.renorm_band is not None and g["exp_step"] % self.band_check_every == 0:
            n0 = g["exp_n0"]
            return not (n0 / self.renorm_band <= n <= n0 * self.renorm_band)
        return False

    @torch.no_grad()
    def _renorm(self, g: dict, n: float) -> float:
        k = expmath.renorm_log2(n, g["exp_n0"])
        c = math.ldexp(1.0, k)
        params = list(g["params"])
        bufs = [self.state[p]["momentum_buffer"] for p in params
                if self.state.get(p, {}).get("momentum_buffer") is not None]
        if k != 0:  # c = 1: nothing to rescale (counted all the same: a renorm_every tick is a renormalisation)
            torch._foreach_mul_(params, 1.0 / c)  # exact: 1/c is a power of two too
            if bufs:
                torch._foreach_mul_(bufs, c)
        _put(g, log2_A=g["exp_log2_A"] + k, last_renorm_log2=g["exp_last_renorm_log2"] + k,
             renorm_count=g["exp_renorm_count"] + 1, weight_norm=n / c, weight_norm_step=g["exp_step"])
        if self.on_renorm is not None:
            self.on_renorm(g["exp_index"], c)
        return c

    def renormalize_(self, group_index: Optional[int] = None) -> dict[int, float]:
        """Renormalise now: one group (must be scale_invariant) or all invariant groups that have stepped.

        A collective when norm_reduce is: call it on every rank. Under DeepSpeed with bf16/fp16 the params
        here are the fp32 masters, copied to the model at the next engine step; renormalisation inside
        step() (renorm_every / renorm_band) has no such gap. Returns {group_index: c}.
        """
        if group_index is not None:
            g = self._group(group_index)
            if not g["scale_invariant"]:
                raise ValueError(f"param group {group_index} is not scale_invariant; it cannot be renormalised")
            groups = [g]
        else:
            groups = [g for g in self.param_groups if g["scale_invariant"]]
        groups = [g for g in groups if g["exp_n0"] is not None]
        return {g["exp_index"]: self._renorm(g, n) for g, n in zip(groups, self._group_norms(groups))}

    # ------------------------------------------------------------------------------------------ state

    def exp_state_dict(self) -> dict:
        """Only the per-group scalar bookkeeping (floats/ints/None); momentum buffers are not included."""
        return {"version": _EXP_STATE_VERSION, "groups": [_get(g) for g in self.param_groups]}

    def load_exp_state_dict(self, state: dict) -> None:
        """Restore exp_state_dict()'s scalars (version 1 states too: their log_A holds every renormalisation)."""
        if state.get("version") not in (1, _EXP_STATE_VERSION):
            raise ValueError(f"exp state version {state.get('version')!r}, expected {_EXP_STATE_VERSION}")
        groups = [{**_V2_KEYS, **saved} for saved in state["groups"]]
        if len(groups) != len(self.param_groups):
            raise ValueError(f"exp state has {len(groups)} param groups, the optimizer has {len(self.param_groups)}")
        for i, (saved, g) in enumerate(zip(groups, self.param_groups)):
            missing = set(_EXP_DEFAULTS) - set(saved)
            if missing:
                raise ValueError(f"param group {i}: exp state lacks {sorted(missing)}")
            if bool(saved["scale_invariant"]) != bool(g["scale_invariant"]):
                raise ValueError(f"param group {i}: saved scale_invariant={saved['scale_invariant']} but the "
                                 f"optimizer has {g['scale_invariant']}")
            if saved["index"] != g["exp_index"]:
                raise ValueError(f"param group {i}: saved group index {saved['index']!r} != {g['exp_index']!r}")
        for saved, g in zip(groups, self.param_groups):
            _put(g, **{k: saved[k] for k in _EXP_DEFAULTS})

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's load, then a check that the restored groups carry ExpSGD bookkeeping."""
        super().load_state_dict(state_dict)
        for i, g in enumerate(self.param_groups):
            if "exp_step" in g:  # saved before version 2: its log_A holds every renormalisation
                for k, v in _V2_KEYS.items():
                    g.setdefault("exp_" + k, v)
            if any("exp_" + k not in g for k in _EXP_DEFAULTS):
                raise ValueError(f"param group {i} of the loaded state has no ExpSGD bookkeeping (exp_* keys): "
                                 "was it saved from another optimizer?")
            self._validate_group(g)

    # ------------------------------------------------------------------------------------------ logging

    def group_stats(self) -> list[dict]:
        """Per group, values of the LAST step taken (NaN before a group's first step).

        base_lr: eta_t; applied_lr: LR actually applied; log_A: log A (renormalisations included);
        weight_norm: |w| after the step (and any renormalisation); effective_lr: applied_lr/|w|^2 with |w| in
        the scale the LR was applied in, i.e. before the step's renormalisation (the step size on the unit
        sphere, unchanged by renormalising; for an invariant group it is r_t times SGD's lr/|theta_{t+1}|^2,
        r_t = A_{t+1}/A_t ~ 1 - lr*wd/(1-gamma), so the two arms of a comparison log nearly the same curve);
        renorm_count; scale_invariant.
        Norms not computed at the last step are computed here: one device->host sync, and a collective when
        norm_reduce is set (call it on every rank, as the training loop does).
        """
        stale = [g for g in self.param_groups if g["exp_step"] > 0 and g["exp_weight_norm_step"] != g["exp_step"]]
        if stale:
            for g, n in zip(self.param_groups, self._group_norms(self.param_groups)):
                _put(g, weight_norm=n, weight_norm_step=g["exp_step"])
        out = []
        nan = float("nan")
        for g in self.param_groups:
            applied = g["exp_applied_lr"] if g["exp_applied_lr"] is not None else nan
            norm = g["exp_weight_norm"] if g["exp_weight_norm"] is not None else nan
            # the norm in the applied LR's scale: ldexp is exact, so this is the unrenormalised run's number
            pre = math.ldexp(norm, g["exp_last_renorm_log2"]) if math.isfinite(norm) else norm
            out.append({
                "base_lr": g["exp_lr"] if g["exp_lr"] is not None else float(g["lr"]),
                "applied_lr": applied,
                "log_A": g["exp_log_A"] + g["exp_log_A_lo"] + g["exp_log2_A"] * math.log(2.0),
                "weight_norm": norm,
                "effective_lr": applied / pre ** 2 if pre > 0 else nan,
                "renorm_count": g["exp_renorm_count"],
                "scale_invariant": g["exp_scale_invariant"],
            })
        return out
