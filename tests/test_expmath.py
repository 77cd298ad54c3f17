"""The exponential-LR math (bigexp.optim.expmath), checked against direct float64 simulation."""
import math

import numpy as np
import pytest

from bigexp.optim import expmath as em


# ---------------------------------------------------------------------------------------------------------
# A scale-invariant toy problem in plain numpy: L(theta) = 0.5*|X u - y|^2 / n with u = theta/|theta|.
# Its gradient is exactly (-1)-homogeneous, so the equivalence has no eps error: what is left is rounding.

def _toy(d=12, n=40, seed=0):
    rng = np.random.default_rng(seed)
    x, y, w0 = rng.normal(size=(n, d)), rng.normal(size=n), rng.normal(size=d)

    def grad(th):
        nrm = np.linalg.norm(th)
        u = th / nrm
        gu = x.T @ (x @ u - y) / n
        return (gu - u * (u @ gu)) / nrm

    return w0, grad


def _sgd(w0, grad, lrs, wds, momentum):
    th, v, out = w0.copy(), None, [w0.copy()]
    for lr, wd in zip(lrs, wds):
        d = grad(th) + wd * th
        v = d.copy() if v is None else momentum * v + d
        th = th - lr * v
        out.append(th.copy())
    return out


def _direction_err(a, b):
    return float(np.linalg.norm(a / np.linalg.norm(a) - b / np.linalg.norm(b)))


@pytest.mark.parametrize("momentum", [0.0, 0.5, 0.9, 0.99])
def test_recursion_reproduces_sgd_with_weight_decay_for_an_arbitrary_schedule(momentum):
    rng = np.random.default_rng(1)
    steps = 400
    # An adversarial base schedule: random LR jumps (up and down), exact zeros (warmup from 0 / cosine to 0),
    # and a time-varying weight decay. The recursion claims exactness for ANY schedule.
    # (Peak LR 0.1: at 0.3 this toy problem is chaotic with momentum 0.9 -- SGD itself turns a 1e-14 change of
    # theta_0 into 1e-6 after 400 steps -- and no equivalence could be checked to rounding.)
    lrs = 0.1 * rng.uniform(0.2, 1.0, steps) * (rng.uniform(size=steps) > 0.05)
    lrs[:3] = [0.0, 0.05, 0.1]
    # A_t shrinks ~ lr*wd/(1-gamma) per step: scaling wd by (1-gamma) moves A equally far for every momentum
    # while keeping the effective LR (which grows as |theta| shrinks) out of the chaotic regime.
    wds = 3e-2 * (1.0 - momentum) * rng.uniform(0.0, 2.0, steps)
    w0, grad = _toy()
    ref = _sgd(w0, grad, lrs, wds, momentum)
    applied, log_a = em.equivalent_schedule(lrs, wds, momentum)
    exp_run = _sgd(w0, grad, applied, np.zeros(steps), momentum)
    a = np.exp(log_a)
    assert a[-1] < 0.7  # the schedule really moved A (else the test could not fail)
    # Tolerance: 400 float64 steps, each adding a few ulps of relative rounding in both runs; the toy
    # problem is well conditioned, so the error stays ~1e-14. 1e-12 leaves a 100x margin but would
    # still catch any O(lr*wd) ~ 1e-3 modelling error.
    worst_pos = max(float(np.linalg.norm(r / at - e) / np.linalg.norm(e)) for r, at, e in zip(ref, a, exp_run))
    assert worst_pos < 1e-12, worst_pos
    assert _direction_err(ref[-1], exp_run[-1]) < 1e-12


def test_dropping_the_recursion_breaks_the_equivalence():
    # The same check must fail for a naive schedule (plain alpha powers from zero buffers): the test above
    # is sensitive to the thing it claims.
    steps, lr, wd, momentum = 300, 0.1, 3e-3, 0.9
    w0, grad = _toy()
    ref = _sgd(w0, grad, [lr] * steps, [wd] * steps, momentum)
    naive = _sgd(w0, grad, em.constant_exp_lr(lr, wd, momentum, np.arange(steps)), np.zeros(steps), momentum)
    assert _direction_err(ref[-1], naive[-1]) > 1e-6


@pytest.mark.parametrize("lr,wd,momentum", [(0.1, 5e-4, 0.9), (1.0, 1e-3, 0.0), (0.4, 1e-5, 0.99),
                                            (0.05, 0.02, 0.5), (2.0, 1e-5, 0.9)])
def test_alpha_is_the_fixed_point_of_the_recursion(lr, wd, momentum):
    a = em.alpha(lr, wd, momentum)
    assert a == pytest.approx(1.0 + momentum * (1.0 - 1.0 / a) - lr * wd, rel=1e-15, abs=1e-15)
    assert a * a - (1 + momentum - lr * wd) * a + momentum == pytest.approx(0.0, abs=1e-15)
    # larger root: the other root is gamma/alpha <= alpha
    assert momentum / a <= a
    # from zero buffers the ratio converges to alpha (rate gamma/alpha^2 per step; 5000 steps is plenty)
    q, r = 0.0, 1.0
    for _ in range(5000):
        q, r = em.advance(q, r, lr, wd, momentum)
    assert r == pytest.approx(a, rel=1e-14)
    # alpha - 1 keeps full relative precision (no 1 - 0.9999 cancellation)
    am1 = em.alpha_minus_one(lr, wd, momentum)
    assert am1 == pytest.approx(a - 1.0, rel=1e-10)
    x = lr * wd
    # residual relative to the size of its terms (~x): a few ulps for the stable form; the textbook
    # (b + sqrt(disc))/2 - 1 is off by ~1e-16 absolute, i.e. ~1e-12 relative at x = 5e-5.
    assert abs(am1 * am1 + (1 - momentum + x) * am1 + x) < 1e-14 * x


def test_alpha_special_cases():
    assert em.alpha(0.5, 0.1, 0.0) == pytest.approx(0.95, rel=1e-15)  # no momentum: A shrinks by 1 - lr*wd
    assert em.alpha(0.1, 0.0, 0.9) == 1.0  # no weight decay: no exponential at all
    g = 0.81
    bound = (1 - math.sqrt(g)) ** 2
    assert em.exp_form_exists(1.0, bound, g)
    assert em.alpha(1.0, bound, g) == pytest.approx(math.sqrt(g), rel=1e-7)  # double root at the bound
    assert not em.exp_form_exists(1.0, bound * (1 + 1e-9), g)
    assert not em.exp_form_exists(1.0, 1.0, 0.0)  # gamma = 0: alpha = 0 would make A_t = 0


def test_bad_hyperparameters_fail_with_the_numbers():
    with pytest.raises(ValueError) as e:
        em.alpha(0.5, 0.1, 0.9)
    msg = str(e.value)
    assert "0.5" in msg and "0.1" in msg and "0.9" in msg and repr(em.exp_form_bound(0.9)) in msg
    with pytest.raises(ValueError, match="momentum"):
        em.alpha(0.1, 1e-4, 1.0)
    with pytest.raises(ValueError, match="lr"):
        em.alpha(-0.1, 1e-4, 0.9)
    with pytest.raises(ValueError, match="weight_decay"):
        em.alpha(0.1, float("nan"), 0.9)
    # the recursion refuses a step whose ratio is not positive, naming the step
    with pytest.raises(ValueError, match="step 0"):
        em.advance(0.0, 1.0, 10.0, 0.2, 0.9, step=0)
    with pytest.raises(ValueError, match=r"lrs\[1\]"):
        em.equivalent_schedule([0.1, -0.1], 1e-4, 0.9)
    with pytest.raises(ValueError, match="weight_decays"):
        em.equivalent_schedule([0.1, 0.1], [1e-4], 0.9)
    with pytest.raises(ValueError, match="milestones"):
        em.texp_schedule(0.1, 1e-4, 0.9, [50, 20], 0.1, 100)
    with pytest.raises(ValueError, match="form"):
        em.texp_schedule(0.1, 1e-4, 0.9, [50], 0.1, 100, form="nope")
    with pytest.raises(ValueError, match="norm"):
        em.renorm_factor(0.0, 1.0)
    with pytest.raises(ValueError, match="lr_prev"):
        em.next_ratio(1.0, 0.1, 0.0, 1e-4, 0.9)


def test_next_ratio_matches_the_q_form():
    r, lr_prev = 1.0, 0.2
    q = 0.0
    for lr in [0.2, 0.2, 0.05, 0.3, 0.1]:
        r_new = em.next_ratio(r, lr, lr_prev, 3e-3, 0.9)
        q, r_q = em.advance(q, r, lr, 3e-3, 0.9)
        assert r_new == pytest.approx(r_q, rel=1e-15)
        assert r_new == pytest.approx(1 + 0.9 * (lr / lr_prev) * (1 - 1 / r) - lr * 3e-3, rel=1e-15)
        r, lr_prev = r_new, lr


def test_constant_exp_lr_is_the_steady_state_of_the_recursion():
    lr, wd, momentum, steps = 0.1, 5e-4, 0.9, 2000
    closed = em.constant_exp_lr(lr, wd, momentum, np.arange(steps))
    assert closed[0] == pytest.approx(lr / em.alpha(lr, wd, momentum), rel=1e-15)
    steady, _ = em.equivalent_schedule([lr] * steps, wd, momentum, q_init=em.alpha_minus_one(lr, wd, momentum) / lr)
    # exact from the steady-state start: only rounding of 2000 log1p terms (~1e-13 relative)
    np.testing.assert_allclose(steady, closed, rtol=1e-12)
    # from zero buffers they agree only up to a constant factor, reached geometrically (documented)
    zero, _ = em.equivalent_schedule([lr] * steps, wd, momentum)
    ratio = zero / closed
    assert abs(ratio[-1] - ratio[-2]) < 1e-13 and abs(ratio[-1] - 1.0) > 1e-4


MILESTONE_CASES = [
    (0.1, 5e-4, 0.9, [1000, 2000], 0.1, 3000),
    (0.4, 1e-4, 0.9, [300, 600, 800], 0.1, 1000),
    (0.5, 2e-3, 0.0, [100, 250], 0.2, 400),
    (0.05, 2e-4, 0.99, [500], 0.5, 1500),
    (0.1, 5e-4, 0.9, [1, 2, 3], 0.5, 10),  # one-step phases
    (0.1, 5e-4, 0.9, [], 0.1, 50),  # no milestone: constant LR
]


@pytest.mark.parametrize("lr,wd,momentum,ms,gamma,total", MILESTONE_CASES)
def test_texp_closed_form_equals_the_recursion_under_step_decay(lr, wd, momentum, ms, gamma, total):
    lrs = [lr * gamma ** sum(t >= m for m in ms) for t in range(total)]
    for q_init in (0.0, em.alpha_minus_one(lr, wd, momentum) / lr):
        rec_log, rec_log_a = em.equivalent_log_schedule(lrs, wd, momentum, q_init=q_init)
        cf_log, cf_log_a = em.texp_log_schedule(lr, wd, momentum, ms, gamma, total, form="exact", q_init=q_init)
        # Tolerance: both are float64 sums of up to 3000 log terms of size ~1e-4 (|log A| <= ~2); the
        # closed form uses k*log(alpha) + log(c1 + c2*rho^k). 1e-12 absolute in log = 1e-12 relative in LR.
        np.testing.assert_allclose(cf_log_a, rec_log_a, rtol=0, atol=1e-12)
        np.testing.assert_allclose(cf_log, rec_log, rtol=0, atol=1e-12)
    np.testing.assert_allclose(em.texp_schedule(lr, wd, momentum, ms, gamma, total),
                               em.equivalent_schedule(lrs, wd, momentum)[0], rtol=1e-12)


def test_paper_texp_is_exact_only_from_steady_state_and_to_second_order_across_switches():
    lr, momentum, gamma, ms, total = 0.1, 0.9, 0.1, [1000, 2000], 3000
    lrs = [lr * gamma ** sum(t >= m for m in ms) for t in range(total)]

    def gaps(wd):
        paper, _ = em.texp_log_schedule(lr, wd, momentum, ms, gamma, total, form="paper")
        q0 = em.alpha_minus_one(lr, wd, momentum) / lr
        steady, _ = em.equivalent_log_schedule(lrs, wd, momentum, q_init=q0)
        zero, _ = em.equivalent_log_schedule(lrs, wd, momentum)
        return paper, steady, zero

    paper, steady, zero = gaps(5e-4)
    # Phase 0 from the steady start: the paper's literal TEXP is the recursion (rounding only).
    np.testing.assert_allclose(paper[:ms[0]], steady[:ms[0]], rtol=0, atol=1e-12)
    # The taper at each switch is right to first order in lr*wd only: a small fixed factor per switch.
    second = float(np.max(np.abs(paper - steady)))
    first = float(np.max(np.abs(paper - zero)))  # from zero buffers: an O(lr*wd/(1-gamma)) factor
    assert 1e-7 < second < 1e-4 and first > 100 * second
    # ... and that gap is genuinely second order: halving wd quarters it (measured ratio ~4.0).
    paper2, steady2, _ = gaps(2.5e-4)
    ratio = second / float(np.max(np.abs(paper2 - steady2)))
    assert 3.5 < ratio < 4.5, ratio


def test_2_5m_step_bookkeeping_stays_finite_and_precise():
    # 500 ImageNet epochs at batch 256 is ~2.5M steps; step decay at 150/300/450 epochs, linear-scaled LR.
    spe, epochs = 5005, 500
    total = spe * epochs
    lr, wd, momentum = 0.4, 1e-4, 0.9
    ms = [150 * spe, 300 * spe, 450 * spe]
    log_lr, log_a = em.texp_log_schedule(lr, wd, momentum, ms, 0.1, total, form="exact")
    assert np.all(np.isfinite(log_lr)) and np.all(np.isfinite(log_a))
    # log A ~ -335 at the end: the applied LR ~ lr/A^2 ~ e^663 would overflow float64 (max ~e^709) in a
    # slightly longer or higher-LR run, so the bookkeeping must live in log space.
    assert log_a[-1] < -300
    # The optimizer's own per-step bookkeeping (compensated log A), every step, with the band renormalisation
    # a real run would do (|theta~| ~ 1/A, so renormalising resets log A by log c = -log A).
    q, r, hi, lo = 0.0, 1.0, 0.0, 0.0
    renorm_total = 0.0
    band = math.log(16.0)
    lrs = np.repeat([lr * 0.1 ** i for i in range(4)], np.diff([0] + ms + [total]))
    applied_max = 0.0
    step = em.bookkeeping_step
    for t in range(total):
        q, r, hi, lo, applied = step(q, r, hi, lo, float(lrs[t]), wd, momentum)
        if applied > applied_max:
            applied_max = applied
        if abs(hi + lo) > band:
            c = -(hi + lo)
            renorm_total += c
            hi, lo = em.compensated_add(hi, lo, c)
    assert math.isfinite(applied_max) and applied_max < lr * 16.0 ** 3
    assert abs(hi + lo) <= band
    # precision: the bookkeeping (log A plus what renormalisation removed) equals the vectorised closed
    # form. Measured without renormalisation: 2e-13 with the compensated sum, 3e-8 with a plain running
    # sum of the 2.5M log1p terms (a 3e-8 relative error of the applied LR). 1e-11 separates the two.
    assert abs((hi + lo - renorm_total) - log_a[-1]) < 1e-11, (hi + lo - renorm_total) - log_a[-1]


def test_renorm_factor():
    assert em.renorm_factor(32.0, 2.0) == 16.0
    with pytest.raises(ValueError):
        em.renorm_factor(float("inf"), 1.0)
    with pytest.raises(ValueError):
        em.renorm_factor(1.0, -1.0)
