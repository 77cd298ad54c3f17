"""The exponential-LR equivalence of Li & Arora (ICLR 2020), as pure functions of numbers.

Convention (PyTorch SGD, dampening 0): v_t = gamma*v_{t-1} + g_t + lambda_t*theta_t,
theta_{t+1} = theta_t - eta_t*v_t, zero initial buffer.

If the loss is invariant to scaling a parameter group jointly, the run with NO weight decay,
    vt_t = gamma*vt_{t-1} + gt_t,   thetat_{t+1} = thetat_t - etat_t*vt_t,
from the same theta_0 and a zero buffer, satisfies thetat_t = theta_t / A_t (same network function at every
step) when
    r_{-1} = 1,  A_0 = 1,
    r_t = 1 + gamma*(eta_t/eta_{t-1})*(1 - 1/r_{t-1}) - eta_t*lambda_t,
    A_{t+1} = r_t*A_t,    etat_t = eta_t / (A_t*A_{t+1}).
Derivation: write both runs in position form, theta_{t+1} = theta_t - eta_t*g_t - eta_t*lambda_t*theta_t
+ gamma*(eta_t/eta_{t-1})*(theta_t - theta_{t-1}), substitute thetat = theta/A and gt = A*g (gradients of a
0-homogeneous loss are (-1)-homogeneous) and match the coefficients of g_t, theta_t and theta_{t-1}.

Internally the recursion is carried as q_t = (r_t - 1)/eta_t, which obeys
    q_t = gamma*q_{t-1}/r_{t-1} - lambda_t,   r_t = 1 + eta_t*q_t,   q_{-1} = 0,
because (a) it has no division by eta_{t-1}, so a zero LR (warmup from 0, cosine to 0) is fine, and
(b) r_t - 1 ~ -eta*lambda/(1-gamma) ~ 1e-4 is kept as its own number, so log A_t = sum log1p(eta_t*q_t) does not
lose the digits that storing r_t ~ 0.9999 would. The momentum buffers of the two runs are then related by
vt_t = A_t*(v_t + q_t*theta_t).

A_t shrinks geometrically (log A ~ -1000 after 2.5M ImageNet steps), so long schedules are returned in log
space; `equivalent_schedule` exponentiates and may give inf/0 for very long runs without renormalisation.
Renormalisation (the optimizer's job) keeps the weights, and therefore log A, bounded: dividing the weights
by c, multiplying the momentum buffers by c and A_t by c leaves the trajectory unchanged.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

__all__ = [
    "effective_lr",
    "exp_form_bound",
    "exp_form_exists",
    "alpha",
    "alpha_minus_one",
    "next_ratio",
    "advance",
    "compensated_add",
    "bookkeeping_step",
    "equivalent_log_schedule",
    "equivalent_schedule",
    "constant_exp_lr",
    "texp_log_schedule",
    "texp_schedule",
    "renorm_log2",
    "renorm_factor",
    "reduce_log_a",
    "MIN_RENORM_BAND",
]


def _check_momentum(momentum: float) -> None:
    if not (0.0 <= momentum < 1.0) or not math.isfinite(momentum):
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")


def _check_lr_wd(lr: float, weight_decay: float) -> None:
    if not (lr >= 0.0) or not math.isfinite(lr):
        raise ValueError(f"lr must be finite and >= 0, got {lr!r}")
    if not (weight_decay >= 0.0) or not math.isfinite(weight_decay):
        raise ValueError(f"weight_decay must be finite and >= 0, got {weight_decay!r}")


def effective_lr(lr: float, batch_size: int, lr_reference_batch: Optional[int]) -> float:
    """The peak LR eta the math uses: lr, times batch_size / lr_reference_batch when that is set (linear
    scaling of the LR with the global batch). The config validator and `bigexp.optim.build` both call this."""
    return lr if lr_reference_batch is None else lr * batch_size / lr_reference_batch


def exp_form_bound(momentum: float) -> float:
    """The largest lr*weight_decay for which the constant-LR exponential form exists: (1 - sqrt(gamma))**2."""
    _check_momentum(momentum)
    return (1.0 - math.sqrt(momentum)) ** 2


def exp_form_exists(lr: float, weight_decay: float, momentum: float) -> bool:
    """Whether x**2 - (1+gamma-lambda*eta)*x + gamma = 0 has a real positive root (alpha).

    True iff lambda*eta <= (1-sqrt(gamma))**2, except that with gamma = 0 the root 1 - lambda*eta must also be
    > 0 (equality there would make A_t = 0: no finite equivalent run). The config validator checks this very
    function (`bigexp.config.exp_lr_exists` is it), so what validates is what the optimizer accepts.
    """
    _check_lr_wd(lr, weight_decay)
    bound = exp_form_bound(momentum)
    x = lr * weight_decay
    return x < bound or (x == bound and momentum > 0.0)


def alpha_minus_one(lr: float, weight_decay: float, momentum: float) -> float:
    """alpha - 1, computed without cancellation (alpha - 1 ~ -lr*wd/(1-gamma) is tiny in practice).

    y = alpha - 1 is the larger root of y**2 + (1-gamma+x)*y + x = 0 (x = lr*wd); the stable form
    y = -2x / (b + sqrt(b**2 - 4x)) with b = 1-gamma+x > 0 has no subtraction of nearly equal numbers.
    The discriminant is factored as (bound - x)*((1+sqrt(gamma))**2 - x) for the same reason.
    """
    if not exp_form_exists(lr, weight_decay, momentum):
        x = lr * weight_decay
        raise ValueError(
            f"no exponential form: lr*weight_decay = {lr!r}*{weight_decay!r} = {x!r} exceeds "
            f"(1-sqrt(momentum))**2 = (1-sqrt({momentum!r}))**2 = {exp_form_bound(momentum)!r}; "
            "lower lr or weight_decay, or raise momentum")
    x = lr * weight_decay
    sg = math.sqrt(momentum)
    disc = ((1.0 - sg) ** 2 - x) * ((1.0 + sg) ** 2 - x)
    b = 1.0 - momentum + x
    denom = b + math.sqrt(max(disc, 0.0))
    return -2.0 * x / denom if x > 0.0 else 0.0


def alpha(lr: float, weight_decay: float, momentum: float) -> float:
    """The larger root of x**2 - (1 + gamma - lambda*eta)*x + gamma = 0: the per-step shrink factor of A_t
    at a constant (eta, lambda), i.e. the fixed point of the ratio recursion r = 1 + gamma*(1-1/r) - eta*lambda.

    lr (eta) >= 0, weight_decay (lambda) >= 0, momentum (gamma) in [0, 1).
    Raises ValueError (with the numbers and the bound (1-sqrt(gamma))**2) when no real positive root exists.
    """
    return 1.0 + alpha_minus_one(lr, weight_decay, momentum)


def next_ratio(r_prev: float, lr: float, lr_prev: float, weight_decay: float, momentum: float) -> float:
    """r_t = 1 + gamma*(eta_t/eta_{t-1})*(1 - 1/r_{t-1}) - eta_t*lambda_t (the brief's form; lr_prev > 0).

    Start with r_prev = 1 and lr_prev = lr. The optimizer uses `advance`, the same recursion in the q form,
    which also allows a zero lr_prev.
    """
    if not (lr_prev > 0.0):
        raise ValueError(f"lr_prev must be > 0 in the ratio form, got {lr_prev!r}; use advance() (q form)")
    q_prev = (r_prev - 1.0) / lr_prev
    _, r = advance(q_prev, r_prev, lr, weight_decay, momentum)
    return r


def advance(q_prev: float, r_prev: float, lr: float, weight_decay: float, momentum: float,
            step: int | None = None) -> tuple[float, float]:
    """One step of the ratio recursion in q form: returns (q_t, r_t).

    q_t = gamma*q_{t-1}/r_{t-1} - lambda_t, r_t = 1 + eta_t*q_t; start with q_prev = 0, r_prev = 1.
    Raises ValueError when r_t <= 0: A_{t+1} would be <= 0, and a loss invariant to positive scaling says
    nothing about negative scaling, so there is no equivalent run (lr*weight_decay far too large).
    """
    q = momentum * q_prev / r_prev - weight_decay
    r = 1.0 + lr * q
    if not (r > 0.0) or not math.isfinite(r):
        at = f" at step {step}" if step is not None else ""
        raise ValueError(
            f"exponential-LR ratio r = 1 + lr*q = 1 + {lr!r}*{q!r} = {r!r} is not > 0{at} "
            f"(weight_decay={weight_decay!r}, momentum={momentum!r}): lr*weight_decay is far above "
            f"(1-sqrt(momentum))**2 = {exp_form_bound(momentum)!r}, no equivalent exponential run exists")
    return q, r


def compensated_add(hi: float, lo: float, x: float) -> tuple[float, float]:
    """Neumaier-compensated running sum: (hi, lo) + x. The value is hi + lo.

    log A_t is a sum of millions of tiny log1p terms; without compensation its rounding error grows like
    sqrt(steps)*ulp(|log A|) and turns directly into a relative error of the applied LR.
    """
    s = hi + x
    if abs(hi) >= abs(x):
        lo += (hi - s) + x
    else:
        lo += (x - s) + hi
    return s, lo


def bookkeeping_step(q_prev: float, r_prev: float, log_a_hi: float, log_a_lo: float, lr: float,
                     weight_decay: float, momentum: float, step: int | None = None
                     ) -> tuple[float, float, float, float, float]:
    """One optimizer step of bookkeeping: (q_t, r_t, log_A_{t+1} hi, lo, applied_lr_t).

    log A_t is carried as a compensated pair (hi, lo); applied_lr_t = eta_t/(A_t*A_{t+1}) is formed in log
    space so that A_t itself (which under- or overflows float64 after ~1M steps without renormalisation) is
    never materialised. Raises OverflowError with advice when the applied LR itself leaves float64.
    """
    q, r = advance(q_prev, r_prev, lr, weight_decay, momentum, step=step)
    log_r = math.log1p(lr * q)
    log_a_t = log_a_hi + log_a_lo
    if lr == 0.0:
        applied = 0.0
    else:
        try:
            applied = lr * math.exp(-(2.0 * log_a_t + log_r))
        except OverflowError:
            raise OverflowError(
                f"applied LR lr/(A_t*A_(t+1)) overflows float64 (log A_t = {log_a_t!r}) at step {step}: "
                "renormalise the weights (renorm_every / renorm_band)") from None
    hi, lo = compensated_add(log_a_hi, log_a_lo, log_r)
    return q, r, hi, lo, applied


def _as_array(values, n: int, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim == 0:
        arr = np.full(n, float(arr))
    if arr.shape != (n,):
        raise ValueError(f"{name} must be a scalar or have {n} entries, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        bad = int(np.flatnonzero(~np.isfinite(arr) | (arr < 0))[0])
        raise ValueError(f"{name}[{bad}] = {arr[bad]!r} must be finite and >= 0")
    return arr


def equivalent_log_schedule(lrs: Sequence[float], weight_decays, momentum: float,
                            q_init: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """The exact exponential run for any base schedule, in log space.

    lrs: eta_t for t = 0..T-1 (>= 0); weight_decays: lambda_t, scalar or T entries (>= 0); momentum in [0, 1).
    q_init: q_{-1}; 0 for a zero initial momentum buffer in both runs (the default). (alpha_0-1)/eta_0 is the
    steady state that the paper's closed forms assume (see `texp_schedule`).
    Returns (log_applied_lrs [T], log_A [T+1]) as float64 arrays; log of a zero LR is -inf.
    """
    _check_momentum(momentum)
    lr = _as_array(lrs, len(lrs), "lrs")
    wd = _as_array(weight_decays, len(lr), "weight_decays")
    n = len(lr)
    log_a = np.empty(n + 1)
    log_a[0] = 0.0
    hi, lo = 0.0, 0.0
    # r_{-1} = 1 + eta_{-1}*q_{-1} with eta_{-1} = eta_0: q_init = (alpha_0-1)/eta_0 gives r_{-1} = alpha_0.
    q = float(q_init)
    r = 1.0 + (float(lr[0]) * q if n else 0.0)
    for t in range(n):
        q, r = advance(q, r, float(lr[t]), float(wd[t]), momentum, step=t)
        hi, lo = compensated_add(hi, lo, math.log1p(float(lr[t]) * q))
        log_a[t + 1] = hi + lo
    with np.errstate(divide="ignore"):
        log_lr = np.log(lr)
    return log_lr - log_a[:-1] - log_a[1:], log_a


def equivalent_schedule(lrs: Sequence[float], weight_decays, momentum: float,
                        q_init: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """(applied_lrs [T], log_A [T+1]) of the exact exponential run: applied_lr_t = eta_t / (A_t*A_{t+1}).

    See `equivalent_log_schedule`. The applied LRs overflow float64 once |log A| > ~350 (no renormalisation,
    ~1M ImageNet steps); use the log form there.
    """
    log_lr, log_a = equivalent_log_schedule(lrs, weight_decays, momentum, q_init)
    with np.errstate(over="ignore"):
        return np.exp(log_lr), log_a


def constant_exp_lr(lr: float, weight_decay: float, momentum: float, t):
    """eta * alpha**(-2t-1): the paper's exponential LR for constant (eta, lambda), at step(s) t >= 0.

    Exact for the recursion only from its steady state (r_{-1} = alpha, i.e. q_init = (alpha-1)/eta, an
    initial exp-run buffer of (alpha-1)/(eta*alpha)*theta_0 instead of 0); from zero buffers r_t -> alpha
    geometrically at rate gamma/alpha**2 per step, so the two differ by a constant factor in A after the
    transient: applied LRs differ by a fixed relative amount ~ 2*gamma*eta*lambda/(1-gamma)**2.
    """
    log_alpha = math.log1p(alpha_minus_one(lr, weight_decay, momentum))
    t = np.asarray(t, dtype=np.float64)
    with np.errstate(over="ignore"):
        out = lr * np.exp(-(2.0 * t + 1.0) * log_alpha)
    return float(out) if out.ndim == 0 else out


def _phases(lr: float, milestones_steps: Sequence[int], gamma: float, total_steps: int) -> list[tuple[int, int, float]]:
    """[(start, length, eta_I)] for step decay: eta_I = lr*gamma**I after the I-th milestone."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps!r}")
    if not (0.0 < gamma <= 1.0):
        raise ValueError(f"gamma must be in (0, 1], got {gamma!r}")
    ms = [int(m) for m in milestones_steps]
    if any(b <= a for a, b in zip(ms, ms[1:])) or any(m <= 0 for m in ms):
        raise ValueError(f"milestones_steps must be strictly increasing and > 0, got {list(milestones_steps)!r}")
    bounds = [0] + [m for m in ms if m < total_steps] + [total_steps]
    return [(a, b - a, lr * gamma ** i) for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]


def texp_log_schedule(lr: float, weight_decay: float, momentum: float, milestones_steps: Sequence[int],
                      gamma: float, total_steps: int, form: str = "exact",
                      q_init: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Step decay's equivalent exponential LR in closed form per phase, vectorised: (log_applied [T], log_A [T+1]).

    form="paper": the paper's literal TEXP (Li & Arora 2020, Tapered-Exponential schedule): with
      alpha_I the root for (eta_I, lambda), etat_0 = eta_0/alpha_0, etat_t = etat_{t-1}*alpha_I**-2 inside phase I
      and etat_t = etat_{t-1}*(eta_I/eta_{I-1})/(alpha_{I-1}*alpha_I) at the switch t = T_I (the taper),
      i.e. A_t = prod_{s<t} alpha_{I(s)}.
    form="exact": the closed form of the exact recursion. Inside a phase with constant eta, the ratios obey
      r = a - gamma/r_prev (a = 1+gamma-eta*lambda), a Moebius map, so A_{T+k} = A_T*p_k with
      p_{k+1} = a*p_k - gamma*p_{k-1}, p_0 = 1, p_1 = r_T:  p_k = c1*alpha**k + c2*beta**k,
      beta = gamma/alpha, c1 = (r_T-beta)/(alpha-beta), c2 = (alpha-r_T)/(alpha-beta);
      r_T, the first ratio of the phase, comes from the recursion across the switch.
    The paper's TEXP is the exact form with c2 = 0 in every phase, i.e. it assumes the ratio is already at its
    phase's fixed point alpha_I. That holds exactly inside phase 0 from the steady-state start
    (q_init = (alpha_0-1)/eta_0; the paper's initial condition), but not from zero buffers, and not across a
    switch: there r_T - alpha_I = gamma*(rho*(1-1/alpha_{I-1}) - (1-1/alpha_I)) with rho = eta_I/eta_{I-1},
    which vanishes to first order in eta*lambda but not exactly. The c2*beta**k term decays like
    (gamma/alpha**2)**k, so the paper's form is only asymptotically equal; the gap is a fixed factor in A per
    switch (measured in tests/test_expmath.py).
    q_init only affects form="exact" (the paper form fixes its own start).
    """
    if form not in ("exact", "paper"):
        raise ValueError(f"form must be 'exact' or 'paper', got {form!r}")
    _check_momentum(momentum)
    phases = _phases(lr, milestones_steps, gamma, total_steps)
    log_a = np.empty(total_steps + 1)
    log_a[0] = 0.0
    lrs = np.empty(total_steps)
    q_prev = float(q_init)
    r_prev = 1.0 + phases[0][2] * q_prev
    for start, length, eta in phases:
        lrs[start:start + length] = eta
        am1 = alpha_minus_one(eta, weight_decay, momentum)
        a_ = 1.0 + am1
        log_alpha = math.log1p(am1)
        k = np.arange(1, length + 1, dtype=np.float64)  # A_{start+k} / A_start for k = 1..length
        if form == "paper":
            log_p = k * log_alpha
        else:
            _, r_t = advance(q_prev, r_prev, eta, weight_decay, momentum, step=start)
            beta = momentum / a_
            if a_ == beta or (a_ - beta) <= 1e-15 * a_:
                # double root alpha = beta = sqrt(gamma): p_k = alpha**k * (1 + k*(r_T/alpha - 1))
                tail = 1.0 + k * (r_t / a_ - 1.0)
            else:
                c1 = (r_t - beta) / (a_ - beta)
                c2 = (a_ - r_t) / (a_ - beta)
                ratio = beta / a_
                with np.errstate(under="ignore"):
                    tail = c1 + c2 * ratio ** k
            if np.any(tail <= 0):
                bad = int(np.flatnonzero(tail <= 0)[0]) + 1
                raise ValueError(f"exact TEXP: A would reach 0 at step {start + bad} (phase starting at step "
                                 f"{start}, lr {eta!r}); no equivalent exponential run")
            log_p = k * log_alpha + np.log(tail)
            # ratio and q of the phase's last step, for the recursion across the next switch; r-1 is formed
            # from differences of log p (no 1 - 0.9999 cancellation beyond what log1p/expm1 resolve).
            last = log_p[-1] - (log_p[-2] if length >= 2 else 0.0)
            r_prev = math.exp(last)
            q_prev = math.expm1(last) / eta
        base = log_a[start]
        log_a[start + 1:start + length + 1] = base + log_p
    with np.errstate(divide="ignore"):
        log_lr = np.log(lrs)
    return log_lr - log_a[:-1] - log_a[1:], log_a


def texp_schedule(lr: float, weight_decay: float, momentum: float, milestones_steps: Sequence[int],
                  gamma: float, total_steps: int, form: str = "exact", q_init: float = 0.0) -> np.ndarray:
    """Per-step applied LRs of step decay's exponential equivalent (TEXP); see `texp_log_schedule`.

    lr: base LR eta_0 (> 0); weight_decay: lambda (constant); milestones_steps: steps at which the LR is
    multiplied by gamma in (0, 1]; total_steps > 0. form="paper" is the paper's literal TEXP, form="exact"
    agrees with `equivalent_schedule` (the recursion) to rounding.
    """
    log_lr, _ = texp_log_schedule(lr, weight_decay, momentum, milestones_steps, gamma, total_steps, form, q_init)
    with np.errstate(over="ignore"):
        return np.exp(log_lr)


def renorm_log2(norm: float, target_norm: float) -> int:
    """k = round(log2(norm/target_norm)): the exponent of the power-of-two renormalisation factor c = 2**k.

    Both must be finite and > 0 (a zero or non-finite norm cannot be renormalised).
    """
    if not (math.isfinite(norm) and norm > 0.0):
        raise ValueError(f"cannot renormalise a group with weight norm {norm!r} (must be finite and > 0)")
    if not (math.isfinite(target_norm) and target_norm > 0.0):
        raise ValueError(f"target_norm must be finite and > 0, got {target_norm!r}")
    # log2 of each (not of the quotient): norm/target_norm could overflow for norms ~1e300 apart
    return int(round(math.log2(norm) - math.log2(target_norm)))


def renorm_factor(norm: float, target_norm: float) -> float:
    """c = 2**round(log2(norm/target_norm)): divide the weights by c, multiply momentum buffers and A by c.

    A power of two, so that every one of those rescalings is exact in binary floating point (barring
    subnormals): renormalising changes no bit of the trajectory, in any precision. The cost: the norm lands
    within a factor sqrt(2) of target_norm, not on it. See `renorm_log2` for the argument checks.
    """
    return math.ldexp(1.0, renorm_log2(norm, target_norm))


# ln 2 split Cody-Waite style (fdlibm's constants): LN2_HI has 32 trailing zero bits, so m*LN2_HI is exact for
# |m| < 2**20, and LN2_HI + LN2_LO is ln 2 to ~1e-27.
_LN2_HI = 6.93147180369123816490e-01
_LN2_LO = 1.90821492927058770002e-10


def reduce_log_a(hi: float, lo: float) -> tuple[int, float, float]:
    """Move whole powers of two out of log A = hi + lo: returns (m, hi', lo') with log A = m*ln2 + hi' + lo'.

    The optimizer carries A = 2**E * exp(hi + lo): E is an integer (renormalisations add to it exactly), and
    this keeps |hi + lo| <= ln 2 so the applied LR's exp() never overflows however long the run. The split
    depends on (hi, lo) alone, never on renormalisations, so a run with renormalisations carries the very
    same (hi, lo) as one without (the bitwise-equality argument in `bigexp.optim.expsgd`). hi - m*LN2_HI is
    exact (Sterbenz); the rounding left is m*ulp(LN2_LO) ~ 1e-26*m, far below the compensated sum's.
    """
    if abs(hi) <= _LN2_HI:
        return 0, hi, lo
    m = int(round((hi + lo) / (_LN2_HI + _LN2_LO)))
    return m, hi - m * _LN2_HI, lo - m * _LN2_LO


# The smallest norm band a power-of-two renormalisation can always land inside: |log2(|w|/n0) - k| <= 1/2.
MIN_RENORM_BAND = math.sqrt(2.0)
