"""optim.twin = exact (bigexp.optim.twin.ExactTwin): with the norms' real eps (1e-5), ExpSGD + the exact twin computes
torch.optim.SGD(weight_decay)'s function in train AND eval mode, over hundreds of steps, renormalisation on; native
mode at the same eps does not; and renormalisation stays bitwise lossless with eps > 0 (fp32 and bf16).

Nets: BatchNorm convs, GroupNorm convs, LayerNorm MLP, a joint set through a residual-style add (conv_a(h) +
conv_b(h) -> BN), and conv -> conv -> BN (one norm absorbing two sets: degree 2 in the joint group).
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bigexp.errors import ConfigError
from bigexp.optim.expsgd import ExpSGD
from bigexp.optim.invariance import param_groups, running_stats_rescaler
from bigexp.optim.schedules import ConstantSchedule, CosineSchedule, ParamGroupScheduler, StepSchedule
from bigexp.optim.twin import ExactTwin, compensated_eps, norm_log_scale, rescale_factors

EPS = 1e-5
STEPS = 500
LR, WD, MOM = 0.02, 1e-2, 0.9     # lr*wd/(1-gamma) = 2e-3 per step: A_t falls to ~0.37 over 500 steps
# Tolerance. Both arms compute the same function in exact arithmetic; what separates them is float64 rounding
# (1e-16 per op) amplified by training over 500 steps. The LR is moderate and the nets wide enough that this stays
# small: a 1e-15 relative nudge of the SGD baseline itself grows to <= 1e-10 over these 500 steps (at LR 0.05, or
# with an 8-wide LayerNorm, to 1e-8 and beyond: chaos, not the twin), and the measured twin gaps are ~1e-15..1e-11.
# 1e-9 sits above that floor and far below what native mode shows at eps 1e-5 (its eps relative to the variance
# drifts by A_t**-2: gaps of 1e-6 and more).
TOL = 1e-9

# tiny float64 convs on the shared 2-core machine run 5-20x slower with two contended threads
pytestmark = pytest.mark.usefixtures("one_thread")


def _net(kind: str, eps: float = EPS) -> nn.Module:
    w = 4
    conv = lambda i, o, k=3, s=1: nn.Conv2d(i, o, k, stride=s, padding=k // 2, bias=False)  # noqa: E731
    bn = lambda c: nn.BatchNorm2d(c, eps=eps)  # noqa: E731

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            if kind == "bn":
                self.body = nn.ModuleList([conv(3, w), bn(w), conv(w, w, s=2), bn(w)])
            elif kind == "gn":
                self.body = nn.ModuleList([conv(3, w), nn.GroupNorm(2, w, eps=eps), conv(w, w),
                                           nn.GroupNorm(2, w, eps=eps)])
            elif kind == "ln":
                self.body = nn.ModuleList([nn.Flatten(), nn.Linear(48, 32, bias=False), nn.LayerNorm(32, eps=eps),
                                           nn.Linear(32, 32, bias=False), nn.LayerNorm(32, eps=eps)])
            elif kind == "residual":
                self.body = nn.ModuleList([conv(3, w), bn(w)])
                self.ca, self.cb, self.bn = conv(w, w), conv(w, w, k=1), bn(w)
            elif kind == "degree2":
                self.body = nn.ModuleList([conv(3, w), conv(w, w), bn(w)])
            self.fc = nn.Linear(32 if kind == "ln" else w, 5)

        def forward(self, x):
            for m in self.body:
                x = m(x)
                x = F.relu(x) if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)) else x
            if kind == "residual":
                x = F.relu(self.bn(self.ca(x) + self.cb(x)))
            return self.fc(x if kind == "ln" else x.mean((2, 3)))

    return Net()


def _schedule(kind: str, total: int):
    if kind == "constant":
        return ConstantSchedule(total)
    if kind == "step":
        return StepSchedule(total, [total // 3, 2 * total // 3], 0.3)
    return CosineSchedule(total, final_factor=0.1)


def _data(seed: int, dtype=torch.float64, n: int = 8):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(n, 8, 3, 4, 4, generator=g).to(dtype)
    ys = torch.randint(0, 5, (n, 8), generator=g)
    return xs, ys, torch.randn(16, 3, 4, 4, generator=g).to(dtype)


def _exp_arm(model, example, *, twin: str, renorm_every, wd=WD):
    groups, report = param_groups(model, example, lr=LR, weight_decay=wd)
    tw = ExactTwin(model, report, groups) if twin == "exact" else None
    hook = tw.on_renorm if tw is not None else running_stats_rescaler(model, report, groups)
    opt = ExpSGD(groups, lr=LR, momentum=MOM, weight_decay=wd, renorm_every=renorm_every, renorm_band=None,
                 on_renorm=hook)
    if tw is not None:
        tw.attach(opt)
    return opt, tw


def _step(model, opt, sched, x, y):
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    sched.step()


def _outputs(model, probe) -> tuple[torch.Tensor, torch.Tensor]:
    """(train-mode, eval-mode) outputs on the probe, running stats untouched (saved and restored)."""
    bufs = copy.deepcopy(dict(model.named_buffers()))
    with torch.no_grad():
        train = model(probe)
        model.load_state_dict({**model.state_dict(), **bufs})
        model.eval()
        ev = model(probe)
        model.train()
    return train, ev


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _against_sgd(kind: str, schedule: str, twin: str, steps: int = STEPS) -> tuple[float, float, int]:
    """(max train gap, max eval gap, renormalisations) of ExpSGD(twin) vs torch SGD(weight_decay), float64."""
    torch.manual_seed(0)
    base = _net(kind).double()
    exp = copy.deepcopy(base)
    xs, ys, probe = _data(1)
    groups, _ = param_groups(base, xs[0], lr=LR, weight_decay=WD)
    sgd = torch.optim.SGD(groups, lr=LR, momentum=MOM, weight_decay=WD)
    opt, _ = _exp_arm(exp, xs[0], twin=twin, renorm_every=37)
    s_sgd, s_exp = (ParamGroupScheduler(o, _schedule(schedule, steps)) for o in (sgd, opt))
    gt = ge = 0.0
    for t in range(steps):
        _step(base, sgd, s_sgd, xs[t % len(xs)], ys[t % len(ys)])
        _step(exp, opt, s_exp, xs[t % len(xs)], ys[t % len(ys)])
        if (t + 1) % 100 == 0:
            (tb, eb), (tx, ex) = _outputs(base, probe), _outputs(exp, probe)
            gt, ge = max(gt, _rel(tx, tb)), max(ge, _rel(ex, eb))
    renorms = sum(s["renorm_count"] for s in opt.group_stats())
    return gt, ge, renorms


CASES = [("bn", "step"), ("bn", "cosine"), ("gn", "constant"), ("ln", "cosine"), ("residual", "step"),
         ("degree2", "constant")]


@pytest.mark.parametrize("kind,schedule", CASES)
def test_exact_twin_equals_sgd_with_weight_decay(kind, schedule):
    """Would fail for: eps not compensated (native), eps compensated with the wrong power (d instead of 2d, or the
    group's degree sum missed on `degree2`), running stats not rescaled each step (eval gap), renormalisations
    counted twice (the renorm-only rescaler still installed), the power-of-two part dropped at a renorm."""
    gt, ge, renorms = _against_sgd(kind, schedule, "exact")
    assert renorms >= 10
    assert gt <= TOL and ge <= TOL, f"{kind}/{schedule}: train gap {gt:.2e}, eval gap {ge:.2e}"


@pytest.mark.parametrize("kind", ["bn", "ln"])
def test_native_twin_fails_the_same_bar(kind):
    """The bar discriminates: native mode (eps fixed) at eps 1e-5 misses it by orders of magnitude."""
    gt, ge, _ = _against_sgd(kind, "step", "native", steps=200)
    assert max(gt, ge) > 1000 * TOL, f"native {kind}: train gap {gt:.2e}, eval gap {ge:.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_renormalisation_bitwise_lossless_with_real_eps(dtype):
    """With the exact twin, a run renormalised every 5 steps is BITWISE the run without renormalisation, scaled by
    2**-E: weights, running stats and train/eval outputs, at eps 1e-5. Would fail if eps or the running stats took
    a renormalisation through a rounded float factor instead of an exact power of two, and does fail in native
    mode (asserted below: eps stays put while the weights jump by 2**k)."""
    def run(twin, renorm_every):
        torch.manual_seed(0)
        model = _net("residual").to(dtype)
        xs, ys, probe = _data(2, dtype)
        opt, tw = _exp_arm(model, xs[0], twin=twin, renorm_every=renorm_every, wd=0.05)
        with torch.no_grad():  # small invariant weights (the same function): large steps, the norm grows fast,
            for p in opt.param_groups[0]["params"]:  # so renormalisations divide by 2**k with k != 0
                p.mul_(0.125)
        sched = ParamGroupScheduler(opt, StepSchedule(60, [30], 0.5))
        for t in range(60):
            _step(model, opt, sched, xs[t % len(xs)], ys[t % len(ys)])
        return model, opt, _outputs(model, probe)

    for twin in ("exact", "native"):
        m_r, o_r, out_r = run(twin, 5)
        m_n, o_n, out_n = run(twin, None)
        g_r, g_n = o_r.param_groups[0], o_n.param_groups[0]
        e = g_r["exp_log2_A"] - g_n["exp_log2_A"]
        assert g_r["exp_renorm_count"] == 12 and e != 0
        same_out = all(torch.equal(a, b) for a, b in zip(out_r, out_n))
        if twin == "native":
            assert not same_out, "native mode should differ once renormalisation moved the weights' scale"
            continue
        assert same_out, f"{dtype}: outputs differ by {max(_rel(a.double(), b.double()) for a, b in zip(out_r, out_n)):.2e}"
        inv = {id(p) for p in g_r["params"]}
        for (name, p), q in zip(m_r.named_parameters(), m_n.parameters()):
            want = torch.ldexp(p.detach(), torch.tensor(e)) if id(p) in inv else p.detach()
            assert torch.equal(want.to(dtype), q.detach()), name
        for (name, b), c in zip(m_r.named_buffers(), m_n.buffers()):
            if name.endswith(("running_mean", "running_var")):
                k = e if name.endswith("mean") else 2 * e
                assert torch.equal(torch.ldexp(b, torch.tensor(k)).to(dtype), c), name  # S_r = S_n * 2**-e


def test_eps_and_running_stats_follow_A_exactly():
    """The invariant itself, checked directly after a few steps: eps = eps0 * S**2, S = A**-d (degree 2 on the
    conv -> conv -> BN net), and the math helpers' exactness on a power-of-two change."""
    torch.manual_seed(0)
    model = _net("degree2").double()
    xs, ys, _ = _data(3)
    opt, tw = _exp_arm(model, xs[0], twin="exact", renorm_every=4)
    sched = ParamGroupScheduler(opt, ConstantSchedule(10))
    for t in range(10):
        _step(model, opt, sched, xs[t % len(xs)], ys[t % len(ys)])
    g = opt.param_groups[0]
    log_a = g["exp_log_A"] + g["exp_log_A_lo"] + g["exp_log2_A"] * math.log(2)
    (st,) = tw.state()
    assert st["degrees"] == {0: 2} and st["eps0"] == EPS
    assert math.isclose(st["eps"], EPS * math.exp(-4 * log_a), rel_tol=1e-13)
    assert model.body[2].eps == st["eps"]
    tw.after_step(opt)  # idempotent: nothing changes when A did not
    assert model.body[2].eps == st["eps"]
    # exact powers of two: T -> T + 3 changes eps by exactly 4**-3 and the stats factor is exactly 2**-3
    assert compensated_eps(EPS, 5, 0.1) == compensated_eps(EPS, 2, 0.1) / 64
    assert rescale_factors((2, 0.1), (5, 0.1)) == (0.125, 0.125 ** 2)
    assert norm_log_scale({0: 2, 1: 1}, {0: (3, 0.25), 1: (-1, 0.5)}) == (5, 1.0)


def test_functional_norm_is_refused_naming_it():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, bias=False)
            self.fc = nn.Linear(4, 5)

        def forward(self, x):
            x = F.batch_norm(self.conv(x), None, None, training=True, eps=EPS)
            return self.fc(x.mean((2, 3)))

    model = Functional().double()
    groups, report = param_groups(model, torch.randn(8, 3, 6, 6, dtype=torch.float64), lr=LR, weight_decay=WD)
    assert report.names("invariant") == ["conv.weight"]
    with pytest.raises(ConfigError, match="batch_norm") as e:
        ExactTwin(model, report, groups)
    assert "functional" in str(e.value) and "optim.twin" in str(e.value)


@pytest.mark.slow  # two in-process train() runs (DeepSpeed engine, FFCV): ~30 s alone, minutes on a loaded box
def test_train_resume_is_bitwise_in_exact_mode(tmp_path):
    """A real `train()` (DeepSpeed engine, FFCV data, checkpoints), optim.twin = exact, renormalising every 3 steps:
    run B resumed from run A's epoch-1 checkpoint matches A bitwise at every later step -- weights, BN running
    stats (saved buffers in the twin's scale) and every norm's eps (an attribute, not saved: recomputed from the
    restored A before B's first forward) -- and the validation (eval mode, running stats) is the same. Would fail
    if eps came back as eps0 on resume, or if the resume rescaled the saved running stats again."""
    from conftest import fmnist_betons
    from test_loop_syncs import inprocess_cfg

    from bigexp.run.loop import train

    data = fmnist_betons(tmp_path / "data", train=128, val=32)
    overrides = ("optim.optimizer=expsgd", "optim.twin=exact", "optim.renorm_every=3", "optim.weight_decay=5e-3",
                 "data.batch_size=32", "schedule.kind=cosine")

    def run(*extra):
        rec = {}

        def hook(step, engine):
            mods = dict(engine.ds.module.named_modules())
            rec[step] = ({k: v.detach().clone() for k, v in engine.ds.module.state_dict().items()},
                         {n: m.eps for n, m in mods.items() if isinstance(m, nn.BatchNorm2d)})
        return train(inprocess_cfg(tmp_path, data, "tw", *overrides, *extra), step_hook=hook), rec

    res_a, a = run()
    res_b, b = run(f"run.resume={tmp_path / 'tw' / 'checkpoints' / 'step000000004'}")
    assert sorted(b) == [5, 6, 7, 8]
    eps_moved = 0
    for step in b:
        (sa, ea), (sb, eb) = a[step], b[step]
        differ = [k for k in sa if not torch.equal(sa[k], sb[k])]
        assert not differ, f"step {step}: resumed run differs in {differ}"
        assert ea == eb, f"step {step}: eps differs after the resume"
        eps_moved += sum(e != EPS for e in eb.values())
    assert eps_moved > 0
    assert res_a.val == res_b.val


@pytest.mark.slow
def test_deepspeed_engine_modes_keep_the_exact_twin(tmp_path):
    """2 gloo ranks, real DeepSpeed engines (tests/dist/twin_engine.py): the twin's step post-hook fires through
    ZeRO's one-group-at-a-time steps and the BF16 optimizer, eps ends at eps0/A**2, and train- and eval-mode outputs
    stay at the mode's own rounding floor while native mode, at eps 1e-5 and this fast A_t, misses by far more.
    Would fail if the hook did not fire under a DeepSpeed wrapper (eps stuck at eps0), or rescaled dead buffer
    copies (eval gap)."""
    import json

    from conftest import REPO, run_group, torchrun_cmd

    proc = run_group(torchrun_cmd([str(REPO / "tests" / "dist" / "twin_engine.py"), str(tmp_path)]), timeout=900)
    assert proc.returncode == 0, proc.stdout[-8000:]
    res = json.loads((tmp_path / "twin_engine.json").read_text())
    print(json.dumps(res, indent=1))
    for mode, r in res.items():
        assert r["renorms"] >= 2, mode
        assert r["eps"] == pytest.approx(r["eps_want"], rel=1e-12) and r["eps"] > 2 * EPS, (mode, r)
        # fp32: round-off amplified over 8 steps at a large effective LR (measured 1.5e-7 train, 1.3e-7 eval; native
        # 3e-3 train, 0.18 eval). bf16 / bf16_autocast: the outputs' own 8-bit floor (measured 0.015 / 0.010 train,
        # the same as native's; eval 0.009 / 0.004, where native's running stats are 0.18 off).
        bar = 1e-5 if mode.startswith("fp32") else 0.03
        assert r["exact_train"] < bar and r["exact_eval"] < bar, (mode, r)
        assert r["native_eval"] > 4 * bar, (mode, r)
        if mode.startswith("fp32"):
            assert r["native_train"] > 100 * bar, (mode, r)


@pytest.mark.parametrize("twin", ["exact", "native"])
def test_for_model_drop_in_takes_the_twin(twin):
    """`ExpSGD.for_model(..., twin="exact")` for a user's own script: the same bar as above, eval mode included, on
    the plain constructor path (measured: eval gap 1.2e-13 after 300 steps); native misses it in eval mode (0.83:
    its eps and running stats sit at the twin's scale)."""
    torch.manual_seed(0)
    base = _net("bn").double()
    exp = copy.deepcopy(base)
    xs, ys, probe = _data(1)
    groups, _ = param_groups(base, xs[0], lr=LR, weight_decay=WD)
    sgd = torch.optim.SGD(groups, lr=LR, momentum=MOM, weight_decay=WD)
    opt = ExpSGD.for_model(exp, xs[0], lr=LR, momentum=MOM, weight_decay=WD, renorm_every=37, renorm_band=None,
                           audit_every=None, twin=twin)
    assert (opt.exact_twin is not None) == (twin == "exact")
    for t in range(300):
        for model, o in ((base, sgd), (exp, opt)):
            o.zero_grad(set_to_none=True)
            F.cross_entropy(model(xs[t % len(xs)]), ys[t % len(ys)]).backward()
            o.step()
    (_, eb), (_, ex) = _outputs(base, probe), _outputs(exp, probe)
    ge = _rel(ex, eb)
    assert (ge <= TOL) if twin == "exact" else (ge > 1e3 * TOL), f"{twin}: eval gap {ge:.2e}"
    with pytest.raises(ValueError, match="twin='exat'"):
        ExpSGD.for_model(copy.deepcopy(base), xs[0], lr=LR, twin="exat")
