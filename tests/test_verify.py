"""bigexp verify: passes on the invariant check net, fails loudly on a non-invariant one, exit codes, and the
chaos-reference rule on hand-made histories."""
import math

import pytest

from conftest import REPO

# A tiny config: 3 epochs -> 60 compressed steps, a step decay inside, renormalisation every 25 steps so the
# renorm path (weights / c, momentum * c, BN running stats) is inside the check.
TINY = ["run.epochs=3", "schedule.kind=step", "schedule.milestones=[2]", "optim.renorm_every=25"]


def _cfg(extra=()):
    from bigexp.config import load_config

    return load_config(str(REPO / "configs/fmnist/base.yaml"), [*TINY, *extra])


def test_invariant_net_passes():
    from bigexp.analysis.verify import TOLERANCE, verify

    res = verify(_cfg(), log=lambda s: None)
    assert res.passed
    assert res.steps == 60 and res.steps_per_epoch == 20 and res.checked_steps == 60
    assert res.renorms >= 2
    assert res.max_gap < TOLERANCE
    assert res.history[0][1:4] == (0.0, 0.0, 0.0)
    assert len(res.invariant_params) == 3  # the three conv weights, found by the real detector


def test_noninvariant_net_fails_loudly(capsys):
    from bigexp.cli import main

    assert main(["verify", "--config", str(REPO / "configs/fmnist/base.yaml"), *TINY,
                 "--network", "noninvariant"]) == 1
    err = capsys.readouterr().err
    assert "FAIL" in err and "NOT equivalent" in err
    from bigexp.analysis.verify import verify

    res = verify(_cfg(), network="noninvariant", log=lambda s: None)
    assert not res.passed and res.max_gap > 1e-4 and res.first_failure is not None and res.first_failure <= 10


def test_cli_pass_prints_gaps(capsys):
    from bigexp.cli import main

    assert main(["verify", "--config", str(REPO / "configs/fmnist/base.yaml"), *TINY]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "weights' direction" in out and "outputs (probe logits)" in out


def test_bad_config_exits_2(capsys):
    from bigexp.cli import main

    with pytest.raises(SystemExit) as e:
        main(["verify", "optim.momentum=1.5"])
    assert e.value.code == 2
    assert "optim.momentum" in capsys.readouterr().err


def test_compressed_steps():
    from bigexp.analysis.verify import MAX_STEPS, compressed_steps

    assert compressed_steps(3) == (20, 60)
    assert compressed_steps(90) == (20, 1800)
    spe, total = compressed_steps(300)
    assert spe == 6 and total <= MAX_STEPS
    assert compressed_steps(5000) == (1, 5000)  # at least one step per epoch, the schedule needs it


def test_judge_chaos_reference_rule():
    """History rows: (step, direction, plain, output, eval output, reference divergence)."""
    from bigexp.analysis.verify import judge

    kw = dict(total=100, spe=20, invariant=["conv"], renorms=0, seconds=0.0)
    # Below the tolerance: pass.
    assert judge([(0, 0, 0, 0, 0, 1e-10), (50, 1e-12, 1e-12, 1e-11, 1e-11, 1e-9)], **kw).passed
    # Above 1e-8 but far below the chaos reference (training is chaotic): pass.
    r = judge([(0, 0, 0, 0, 0, 1e-10), (50, 1e-7, 1e-7, 2e-7, 0, 1e-4)], **kw)
    assert r.passed and r.max_gap == 2e-7
    # Above 1e-8 and not below 0.1 x the reference: fail, at that step.
    r = judge([(0, 0, 0, 0, 0, 1e-10), (50, 1e-6, 0, 0, 0, 1e-9), (100, 1e-3, 0, 0, 0, 1e-4)], **kw)
    assert not r.passed and r.first_failure == 50
    # After the reference has diverged past the horizon nothing counts.
    r = judge([(0, 0, 0, 0, 0, 1e-10), (50, 1e-12, 0, 0, 0, 1e-5), (100, 0.5, 0.5, 0.5, 0.5, 0.4)], **kw)
    assert r.passed and r.checked_steps == 50 and r.max_gap == 1e-12
    # A blow-up (inf) is a failure, not a pass.
    assert not judge([(0, 0, 0, 0, 0, 1e-10), (50, math.inf, math.inf, math.inf, math.inf, 1e-9)], **kw).passed
    # The eval column: judged with twin "exact" only (native's running stats lag by design; it is printed).
    lagging = [(0, 0, 0, 0, 0, 1e-10), (50, 1e-12, 0, 1e-12, 3e-3, 1e-9)]
    r = judge(lagging, **kw)
    assert r.passed and r.eval_rel_gap == 3e-3 and r.max_gap == 1e-12
    r = judge(lagging, **kw, twin="exact")
    assert not r.passed and r.first_failure == 50 and r.max_gap == 3e-3


def test_exact_twin_passes_with_the_real_eps_and_eval_mode(capsys):
    """optim.twin=exact: the check net gets the config's BN eps (1e-5, not the tiny BN_EPS) and the ExactTwin, and
    both train- and eval-mode outputs stay under the bar. Native on the same config passes train mode (tiny eps)
    but its eval gap -- running stats rescaled at renormalisations only -- is orders above it: printed, not judged.
    Would fail if verify ignored optim.twin (eps 1e-12, or no twin: eval gap ~1e-3)."""
    from bigexp.analysis.verify import BN_EPS, TOLERANCE, format_result, verify

    res = verify(_cfg(["optim.twin=exact"]), log=lambda s: None)
    assert res.twin == "exact" and res.bn_eps == 1e-5
    assert res.passed and res.max_gap < TOLERANCE and res.eval_rel_gap < TOLERANCE, format_result(res)
    assert res.renorms >= 2
    native = verify(_cfg(), log=lambda s: None)
    assert native.passed and native.bn_eps == BN_EPS
    assert native.eval_rel_gap > 1e3 * TOLERANCE, format_result(native)
    text = format_result(native)
    assert "eval-mode outputs" in text and "not judged" in text
    from bigexp.cli import main

    assert main(["verify", "--config", str(REPO / "configs/fmnist/base.yaml"), *TINY, "optim.twin=exact"]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "eval-mode outputs" in out and "not judged" not in out
