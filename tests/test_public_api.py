"""The public names of bigexp.optim and bigexp.data: each importable from the package, each the object its home
module defines, and each usable in a few lines (ExpSGD on a tiny BatchNorm conv net matches torch SGD)."""
from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import bigexp.data
import bigexp.optim
from bigexp.optim import (BaseSchedule, ConstantSchedule, CosineSchedule, ExpSGD, InvarianceReport, LinearSchedule,
                          ParamGroupScheduler, StepSchedule, alpha, build_schedule, constant_exp_lr, effective_lr,
                          equivalent_log_schedule, equivalent_schedule, exp_form_bound, exp_form_exists,
                          find_scale_invariant, param_groups, renorm_factor, running_stats_rescaler,
                          scheduler_factory, texp_log_schedule, texp_schedule)

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("package", [bigexp.optim, bigexp.data], ids=["optim", "data"])
def test_every_exported_name_resolves_to_its_home_module(package):
    for name in package.__all__:
        obj = getattr(package, name)
        home = getattr(obj, "__module__", None)
        if home is None:  # constants (FMNIST_MEAN ...) carry no module
            continue
        # error classes all live in bigexp.errors and are re-exported (DataError)
        assert home.startswith(package.__name__ + ".") or home == "bigexp.errors", (name, home)
        assert getattr(importlib.import_module(home), name) is obj, name


def test_optim_lazy_names_match_the_type_checking_imports():
    """bigexp.optim imports its torch-backed names on first use; the TYPE_CHECKING block (what type checkers and
    go-to-definition read) must name the same names from the same modules."""
    tree = ast.parse((REPO / "bigexp" / "optim" / "__init__.py").read_text())
    block = next(n for n in tree.body if isinstance(n, ast.If) and getattr(n.test, "id", "") == "TYPE_CHECKING")
    declared = {a.name: imp.module for imp in block.body for a in imp.names}
    assert declared == bigexp.optim._LAZY
    assert set(declared) <= set(bigexp.optim.__all__)


def test_config_and_data_import_without_torch():
    """bigexp.config checks configs with expmath's rule; neither it nor bigexp.data may pull in torch (4-7 s)."""
    code = ("import sys, bigexp.config, bigexp.data, bigexp.optim.expmath\n"
            "heavy = [m for m in ('torch', 'ffcv') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


def test_config_uses_the_optimizer_math_itself():
    import bigexp.config as config
    import bigexp.optim.expmath as expmath
    assert config.exp_lr_exists is expmath.exp_form_exists and config.exp_lr_bound is expmath.exp_form_bound
    assert config.effective_lr is expmath.effective_lr
    assert effective_lr(0.1, 512, 256) == pytest.approx(0.2) and effective_lr(0.1, 512, None) == 0.1


class TinyBNNet(nn.Module):
    """conv -> BatchNorm -> ReLU -> pool -> linear: the conv (weight and bias) is scale invariant."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4, eps=1e-12)  # tiny eps: BN's eps is the only thing that breaks invariance
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        return self.fc(x.mean(dim=(2, 3)))


def test_expsgd_from_find_scale_invariant_and_param_groups_matches_sgd():
    torch.manual_seed(0)
    model = TinyBNNet().double()
    x, y = torch.randn(8, 3, 6, 6, dtype=torch.float64), torch.randint(0, 3, (8,))
    report = find_scale_invariant(model, x)
    assert isinstance(report, InvarianceReport)
    assert sorted(report.names("invariant")) == ["conv.bias", "conv.weight"]

    lr, wd, mom = 0.1, 5e-3, 0.9
    twin = TinyBNNet().double()
    twin.load_state_dict(model.state_dict())
    groups, report = param_groups(model, x, lr=lr, weight_decay=wd)
    assert [g["scale_invariant"] for g in groups] == [True, False]
    exp = ExpSGD(groups, lr=lr, momentum=mom, weight_decay=wd, renorm_every=2,
                 on_renorm=running_stats_rescaler(model, report, groups))
    sgd = torch.optim.SGD(twin.parameters(), lr=lr, momentum=mom, weight_decay=wd)
    loss = nn.CrossEntropyLoss()
    for _ in range(6):  # renormalises at steps 2, 4, 6
        for net, opt in ((model, exp), (twin, sgd)):
            opt.zero_grad()
            loss(net(x), y).backward()
            opt.step()
    model.train(), twin.train()
    with torch.no_grad():
        out, ref = model(x), twin(x)
    assert torch.allclose(out, ref, rtol=0, atol=1e-9), (out - ref).abs().max()
    # the plain group (BN affine, classifier) is torch SGD with weight decay; it sees the same activations up to
    # rounding (the invariant weights are a rescaled copy), so it agrees to rounding too
    assert torch.allclose(model.fc.weight, twin.fc.weight, rtol=0, atol=1e-12)
    assert exp.group_stats()[0]["renorm_count"] == 3


def test_math_and_schedule_helpers():
    a = alpha(0.1, 5e-4, 0.9)
    assert 0 < a < 1 and exp_form_exists(0.1, 5e-4, 0.9) and 0.1 * 5e-4 < exp_form_bound(0.9)
    assert constant_exp_lr(0.1, 5e-4, 0.9, 0) == pytest.approx(0.1 / a)
    lrs = [0.1] * 30 + [0.01] * 30
    exact, _ = equivalent_schedule(lrs, 5e-4, 0.9)
    log_exact, _ = equivalent_log_schedule(lrs, 5e-4, 0.9)
    texp = texp_schedule(0.1, 5e-4, 0.9, [30], 0.1, 60, form="exact")
    log_texp, _ = texp_log_schedule(0.1, 5e-4, 0.9, [30], 0.1, 60)
    assert texp == pytest.approx(exact, rel=1e-12) and log_texp == pytest.approx(log_exact, rel=1e-12)
    assert renorm_factor(4.0, 2.0) == 2.0

    for sched in (ConstantSchedule(10), StepSchedule(10, [5], 0.1), CosineSchedule(10), LinearSchedule(10)):
        assert isinstance(sched, BaseSchedule) and sched.lr_factor(0) == 1.0
    from bigexp.config.schema import ScheduleConfig
    step = build_schedule(ScheduleConfig(kind="step", milestones=[1]), steps_per_epoch=5, total_steps=10)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.5)
    sched = scheduler_factory(step)(opt)
    assert isinstance(sched, ParamGroupScheduler)
    for _ in range(5):
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
