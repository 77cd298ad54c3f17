"""Per-step schedules and the param-group scheduler (bigexp.optim.schedules)."""
import copy
import math

import pytest
import torch

from bigexp.config.schema import ScheduleConfig
from bigexp.optim.expsgd import ExpSGD
from bigexp.optim.schedules import (BaseSchedule, CosineSchedule, LinearSchedule, ParamGroupScheduler,
                                    StepSchedule, build_schedule, scheduler_factory)

SPE = 10  # steps per epoch
TOTAL = 200


def cfg(**kw):
    return ScheduleConfig(**kw)


KINDS = {
    "constant": cfg(kind="constant", warmup_epochs=2, warmup_start_factor=0.1),
    "step": cfg(kind="step", milestones=[5, 12], gamma=0.1, warmup_epochs=1.5, warmup_start_factor=0.2),
    "cosine": cfg(kind="cosine", final_factor=0.01, warmup_epochs=2, warmup_start_factor=0.1,
                  weight_decay_follows_lr=True),
    "linear": cfg(kind="linear", final_factor=0.0, warmup_epochs=0),
}


def test_warmup_is_linear_from_the_start_factor():
    s = build_schedule(KINDS["constant"], SPE, TOTAL)
    assert s.warmup_steps == 20
    assert s.lr_factor(0) == pytest.approx(0.1)
    assert s.lr_factor(10) == pytest.approx(0.55)
    assert s.lr_factor(20) == 1.0 and s.lr_factor(TOTAL - 1) == 1.0
    diffs = [s.lr_factor(t + 1) - s.lr_factor(t) for t in range(19)]
    assert max(diffs) - min(diffs) < 1e-15 and min(diffs) > 0


def test_step_milestones_are_epochs_times_steps_per_epoch():
    s = build_schedule(cfg(kind="step", milestones=[5, 12], gamma=0.1), SPE, TOTAL)
    assert s.milestones_steps == [50, 120]
    assert [s.lr_factor(t) for t in (0, 49, 50, 119, 120, 199)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    frac = build_schedule(cfg(kind="step", milestones=[2.5], gamma=0.5, warmup_epochs=0.25), SPE, TOTAL)
    assert frac.milestones_steps == [25] and frac.warmup_steps == 3  # 2.5 steps: half up, not to even


def test_cosine_and_linear_reach_final_factor_at_the_last_step():
    c = build_schedule(KINDS["cosine"], SPE, TOTAL)
    assert c.lr_factor(20) == pytest.approx(1.0)  # end of warmup: the anneal starts at 1
    assert c.lr_factor(TOTAL - 1) == pytest.approx(0.01)
    mid = 20 + (TOTAL - 1 - 20) / 2
    assert CosineSchedule(TOTAL, final_factor=0.01, warmup_steps=20).shape(mid) == pytest.approx(0.505)
    vals = [c.lr_factor(t) for t in range(20, TOTAL)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))
    lin = build_schedule(KINDS["linear"], SPE, TOTAL)
    assert lin.lr_factor(0) == 1.0 and lin.lr_factor(TOTAL - 1) == pytest.approx(0.0, abs=1e-15)
    assert lin.lr_factor(99) == pytest.approx(1 - 99 / 199)
    assert LinearSchedule(1, final_factor=0.5).lr_factor(0) == 0.5  # one step: it is the last; no 0/0


def test_weight_decay_factor_follows_lr_only_when_asked():
    follows = build_schedule(KINDS["cosine"], SPE, TOTAL)
    fixed = build_schedule(KINDS["step"], SPE, TOTAL)
    for t in (0, 7, 60, 150, TOTAL - 1):
        assert follows.wd_factor(t) == follows.lr_factor(t)
        assert fixed.wd_factor(t) == 1.0


def test_bad_schedule_inputs_name_the_key():
    with pytest.raises(ValueError, match=r"schedule.milestones = \[12, 5\]"):
        build_schedule(cfg(kind="step", milestones=[12, 5]), SPE, TOTAL)
    with pytest.raises(ValueError, match="schedule.milestones must be a list of epochs"):
        build_schedule(cfg(kind="step", milestones=["x"]), SPE, TOTAL)
    with pytest.raises(ValueError, match="schedule.kind"):
        build_schedule(cfg(kind="exp"), SPE, TOTAL)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        build_schedule(cfg(), 0, TOTAL)
    with pytest.raises(ValueError, match="total_steps"):
        build_schedule(cfg(), SPE, 0)
    with pytest.raises(ValueError, match="gamma"):
        StepSchedule(10, [5], 0.0)


def _groups():
    ws = [torch.nn.Parameter(torch.randn(3)) for _ in range(3)]
    return [{"params": [ws[0]], "lr": 0.1, "weight_decay": 1e-4},
            {"params": [ws[1]], "lr": 0.02, "weight_decay": 0.0},
            {"params": [ws[2]], "lr": 0.5, "weight_decay": 5e-3, "scale_invariant": True}]


class FlatShardOptimizer:
    """What a DeepSpeed ZeRO wrapper exposes to the scheduler: param_groups that are the client's group dicts
    with params replaced by flat 1-D shards (the scheduler must not care)."""

    def __init__(self, groups):
        self.param_groups = [{**g, "params": [torch.zeros(7)]} for g in groups]


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("make_opt", ["sgd", "expsgd", "flat"])
def test_scheduler_contract(kind, make_opt):
    schedule = build_schedule(KINDS[kind], SPE, TOTAL)
    groups = _groups()
    if make_opt == "sgd":
        opt = torch.optim.SGD([{k: v for k, v in g.items() if k != "scale_invariant"} for g in groups], lr=1.0)
    elif make_opt == "expsgd":
        opt = ExpSGD(groups, lr=1.0)
    else:
        opt = FlatShardOptimizer(groups)
    bases = [(g["lr"], g["weight_decay"]) for g in opt.param_groups]
    sch = scheduler_factory(schedule)(opt)
    assert isinstance(sch, ParamGroupScheduler) and sch.last_step == 0

    def check(t):
        for g, (lr, wd) in zip(opt.param_groups, bases):
            assert g["base_lr"] == lr and g["base_weight_decay"] == wd
            assert g["lr"] == lr * schedule.lr_factor(t)
            assert g["weight_decay"] == wd * schedule.wd_factor(t)
        assert sch.get_last_lr() == [g["lr"] for g in opt.param_groups]

    check(0)  # construction writes step 0's values: the first optimizer step uses them
    for t in range(1, 37):
        sch.step()
        check(t)
    sch.step(increment=1)  # DeepSpeed may pass lr_kwargs
    check(37)
    state = copy.deepcopy(sch.state_dict())
    assert state["last_step"] == 37 and state["schedule"]["kind"] == kind

    # resume into a fresh optimizer whose groups were built with other values (e.g. a changed config lr)
    groups2 = _groups()
    for g in groups2:
        g["lr"] *= 3.0
    if make_opt == "sgd":
        opt2 = torch.optim.SGD([{k: v for k, v in g.items() if k != "scale_invariant"} for g in groups2], lr=1.0)
    elif make_opt == "expsgd":
        opt2 = ExpSGD(groups2, lr=1.0)
    else:
        opt2 = FlatShardOptimizer(groups2)
    sch2 = ParamGroupScheduler(opt2, schedule)
    sch2.load_state_dict(state)
    assert sch2.last_step == 37
    for _ in range(50):
        sch.step()
        sch2.step()
        assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in opt2.param_groups]
        assert [g["weight_decay"] for g in opt.param_groups] == [g["weight_decay"] for g in opt2.param_groups]
    with pytest.raises(ValueError, match="3 param groups, the optimizer has 1"):
        ParamGroupScheduler(FlatShardOptimizer(_groups()[:1]), schedule).load_state_dict(state)


def test_existing_base_values_are_kept():
    # A group that already carries base_lr (built by an earlier scheduler) is not re-based on its current lr.
    opt = FlatShardOptimizer(_groups())
    opt.param_groups[0]["base_lr"] = 1.0
    sch = ParamGroupScheduler(opt, BaseSchedule(10, warmup_steps=5, warmup_start_factor=0.5))
    assert opt.param_groups[0]["lr"] == 0.5


def test_scheduler_drives_torch_sgd_like_lambda_lr():
    """The same LRs as torch's LambdaLR with the same factor (the reference convention for step counting)."""
    schedule = build_schedule(KINDS["step"], SPE, TOTAL)
    w1, w2 = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    o1, o2 = torch.optim.SGD([w1], lr=0.3), torch.optim.SGD([w2], lr=0.3)
    ours = ParamGroupScheduler(o1, schedule)
    ref = torch.optim.lr_scheduler.LambdaLR(o2, schedule.lr_factor)
    for _ in range(TOTAL - 1):
        assert math.isclose(o1.param_groups[0]["lr"], o2.param_groups[0]["lr"], rel_tol=1e-15)
        for o, w in ((o1, w1), (o2, w2)):
            w.grad = torch.ones(2)
            o.step()
        ours.step()
        ref.step()


def test_resume_under_a_changed_schedule_is_refused_naming_what_changed():
    """describe() is stored in the checkpoint 'to be compared on resume': a changed gamma / milestone / length
    must not resume silently (issue 17.5)."""
    from bigexp.errors import CheckpointError

    saved = ParamGroupScheduler(torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.3),
                                StepSchedule(TOTAL, [50, 120], 0.1))
    for _ in range(7):
        saved.step()
    state = copy.deepcopy(saved.state_dict())
    for changed, pieces in ((StepSchedule(TOTAL, [50, 120], 0.5), ["schedule.gamma: 0.1 (checkpoint) -> 0.5 (now)"]),
                            (StepSchedule(TOTAL + 10, [50, 130], 0.1), ["schedule.total_steps: 200", "-> 210",
                                                                        "schedule.milestones_steps: [50, 120]"]),
                            (CosineSchedule(TOTAL), ["schedule.kind: 'step' (checkpoint) -> 'cosine' (now)"])):
        sch = ParamGroupScheduler(torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.3), changed)
        with pytest.raises(CheckpointError) as err:
            sch.load_state_dict(state)
        for piece in pieces:
            assert piece in str(err.value)
        assert sch.last_step == 0  # nothing restored
    same = ParamGroupScheduler(torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.3),
                               StepSchedule(TOTAL, [50, 120], 0.1))
    same.load_state_dict(state)
    assert same.last_step == 7
