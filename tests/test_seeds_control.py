"""compare.seeds and compare.control: the across-seed statistics (against textbook t quantiles and hand
arithmetic), the control's nudge, the departure rule, the per-group layout, and the report's numbers checked against
the raw event files (read with TensorBoard's EventAccumulator, statistics recomputed here with `statistics`)."""
import math
import re
import statistics
from pathlib import Path

import pytest
import torch

from conftest import REPO

# Two-sided 95 % Student t quantiles t_{0.975, dof} from a printed table (4 decimals).
T975 = {1: 12.7062, 2: 4.3027, 3: 3.1824, 4: 2.7764, 5: 2.5706, 6: 2.4469, 7: 2.3646, 8: 2.3060, 9: 2.2622,
        10: 2.2281, 20: 2.0860, 30: 2.0423, 120: 1.9799}


def _scalars_of(run_dir: Path) -> dict:
    """tag -> {step: value}, read with TensorBoard's EventAccumulator (not bigexp's reader)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = {}
    for p in sorted(run_dir.iterdir()):
        if p.is_file() and "tfevents" in p.name:
            acc = EventAccumulator(str(p), size_guidance={"scalars": 0})
            acc.Reload()
            for tag in acc.Tags()["scalars"]:
                out.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return out


def _interval(diffs: list) -> tuple:
    n = len(diffs)
    m, sd = statistics.mean(diffs), statistics.stdev(diffs)
    hw = T975[n - 1] * sd / math.sqrt(n)
    return m, hw


# ---------------------------------------------------------------------------------------------- statistics
def test_t_quantile_matches_the_table():
    from bigexp.analysis.seeds import t_quantile

    for dof, want in T975.items():
        assert t_quantile(0.975, dof) == pytest.approx(want, abs=6e-5), dof
    assert t_quantile(0.95, 10) == pytest.approx(1.8125, abs=6e-5)
    with pytest.raises(ValueError):
        t_quantile(0.4, 3)


def test_paired_difference_interval_and_verdicts():
    from bigexp.analysis.seeds import mean_sd, paired_difference, verdict

    assert mean_sd([1.0]) == (1.0, None)
    m, sd = mean_sd([1.0, 2.0, 4.0])
    assert m == pytest.approx(7 / 3) and sd == pytest.approx(statistics.stdev([1.0, 2.0, 4.0]))
    base = {0: 90.0, 1: 91.0, 2: 90.5, 7: 50.0}
    twin = {0: 91.0, 1: 91.5, 2: 91.2}          # seed 7 unpaired: left out
    d = paired_difference(base, twin)
    assert d.seeds == [0, 1, 2] and d.diffs == pytest.approx([1.0, 0.5, 0.7])
    want_m, want_hw = _interval([1.0, 0.5, 0.7])
    assert d.mean == pytest.approx(want_m) and d.half_width == pytest.approx(want_hw, rel=1e-4)
    assert verdict("expsgd", d) == f"expsgd better by {want_m:.2f} ± {want_hw:.2f} pp"
    worse = paired_difference(twin, base)
    assert verdict("expsgd", worse).startswith("expsgd worse by 0.73 ±")
    noisy = paired_difference({0: 90.0, 1: 91.0}, {0: 91.0, 1: 90.5})   # +1, -0.5: interval holds 0
    assert verdict("expsgd", noisy).startswith("no detectable difference (+0.25 ±")
    assert verdict("expsgd", paired_difference({0: 1.0}, {0: 2.0})).startswith("one seed only")
    assert paired_difference({0: 1.0}, {1: 2.0}) is None


def test_band_uses_common_steps():
    from bigexp.analysis.seeds import band

    steps, mean, sd = band([([1, 2, 3], [1.0, 2.0, 3.0]), ([2, 3, 4], [4.0, 6.0, 8.0])])
    assert steps == [2, 3] and mean == [3.0, 4.5]
    assert sd == pytest.approx([statistics.stdev([2.0, 4.0]), statistics.stdev([3.0, 6.0])])


# ---------------------------------------------------------------------------------------------- departure
def test_departure_rule():
    from bigexp.analysis.departure import FACTOR, compare_departure

    steps = [0, 2, 4]
    # Distances: twin 100x the control at every probe after 0 -> faster; step 0 ignored (control = the nudge).
    d = compare_departure("gap/max_abs_logit", (steps, [0.0, 1e-3, 1e-1]), (steps, [1e-7, 1e-5, 1e-3]))
    assert d.steps == [2, 4] and d.geo_mean == pytest.approx(100.0) and "faster" in d.verdict
    # Similarities: departure is 1 - value; twin at 1/100 of the control -> closer.
    d = compare_departure("gap/top1_agreement", (steps, [1.0, 0.9999, 0.999]), (steps, [1.0, 0.99, 0.9]))
    assert d.geo_mean == pytest.approx(0.01, rel=1e-6) and "closer" in d.verdict
    # Within a factor FACTOR either way: the float-noise level.
    d = compare_departure("gap/kl", (steps, [0, 2e-9, 2e-7]), (steps, [0, 1e-9, 1e-7]))
    assert d.geo_mean == pytest.approx(2.0) and "float-noise level" in d.verdict and FACTOR == 10
    # Both 0 everywhere: nothing departs; a lone 0 counts as the floor (so a departing twin is "faster").
    assert "neither" in compare_departure("gap/kl", (steps, [0, 0, 0]), (steps, [0, 0, 0])).verdict
    assert "faster" in compare_departure("gap/kl", (steps, [0, 0, 1e-9]), (steps, [0, 0, 0])).verdict
    assert "no probe" in compare_departure("gap/kl", ([0], [0]), ([0], [1e-7])).verdict


# ---------------------------------------------------------------------------------------------- the control's nudge
def test_perturbation_is_relative_seeded_and_the_same_every_time():
    from bigexp.analysis.control import PERTURB_SEED, REL, perturb_relative_

    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.BatchNorm1d(7))
    with torch.no_grad():
        a[0].bias.zero_()
    b = __import__("copy").deepcopy(a)
    before = [p.detach().clone() for p in a.parameters()]
    changed = perturb_relative_(a)
    perturb_relative_(b)
    g = torch.Generator().manual_seed(PERTURB_SEED)
    for p, w, q in zip(a.parameters(), before, b.parameters()):
        z = torch.randn(w.shape, generator=g)
        assert torch.equal(p, w + w * (REL * z))        # exactly the documented formula, same z order
        assert torch.equal(p, q)                        # deterministic
        rel = ((p.detach() - w).abs() / w.abs().clamp_min(1e-30))[w != 0]
        if rel.numel():  # relative 1e-7 * |z|, plus float32's rounding of the sum (2**-24)
            assert float(rel.max()) <= REL * float(z.abs().max()) + 6e-8
    assert torch.equal(a[0].bias, torch.zeros(7))       # zero weights stay zero
    assert 0 < changed <= 5 * 7 + 7                     # weight and gamma changed, bias/beta (0) not


class _FakeEngine:
    def __init__(self, model, optimizer):
        self.ds = type("DS", (), {"module": model})()
        self.client_optimizer = optimizer


def test_hook_nudges_at_step_0_only_and_refuses_master_copies():
    from bigexp.analysis.control import PerturbAtStart
    from bigexp.errors import ConfigError

    model = torch.nn.Linear(3, 2)
    seen = []
    hook = PerturbAtStart(then=lambda step, eng: seen.append((step, eng.ds.module.weight.detach().clone())))
    w0 = model.weight.detach().clone()
    engine = _FakeEngine(model, torch.optim.SGD(model.parameters(), lr=0.1))
    hook(0, engine)
    assert not torch.equal(seen[0][1], w0) and hook.changed > 0   # the step-0 probe sees the nudged weights
    w1 = model.weight.detach().clone()
    hook(1, engine)
    assert torch.equal(model.weight, w1) and [s for s, _ in seen] == [0, 1]
    masters = [p.detach().clone().requires_grad_() for p in model.parameters()]
    with pytest.raises(ConfigError, match="master copies"):
        PerturbAtStart()(0, _FakeEngine(model, torch.optim.SGD(masters, lr=0.1)))


def test_config_checks(tmp_path):
    from bigexp.analysis.lockstep import lockstep
    from bigexp.analysis.runner import arm_cfg_for, run_arms, seed_layout
    from bigexp.config import load_config
    from bigexp.errors import ConfigError

    cfg = load_config(str(REPO / "configs/fmnist/base.yaml"),
                      [f"run.out_dir={tmp_path}", "run.name=c", "compare.control=true"])
    assert run_arms(cfg) == ["sgd", "expsgd", "sgd_perturbed"]
    acfg = arm_cfg_for(cfg, "sgd_perturbed", seed=3)
    assert acfg.optim.optimizer == "sgd" and acfg.run.seed == 3
    assert Path(acfg.run.out_dir) / acfg.run.name == tmp_path / "c/sgd_perturbed/seed3"
    assert Path(arm_cfg_for(cfg, "expsgd").run.out_dir) / "expsgd" == tmp_path / "c/expsgd"  # single seed
    cfg.engine.precision = "bf16"
    with pytest.raises(ConfigError, match="compare.control"):
        run_arms(cfg)
    cfg.engine.precision = "fp32"
    cfg.compare.arms = ["expsgd"]
    with pytest.raises(ConfigError, match="no sgd"):
        run_arms(cfg)
    cfg.compare.seeds = [1, 1]
    with pytest.raises(ConfigError, match="compare.seeds"):
        seed_layout(cfg)
    cfg.compare.seeds = [4]
    assert seed_layout(cfg) == [None] and arm_cfg_for(cfg, "expsgd").run.seed == 4
    cfg.compare.arms = ["sgd", "expsgd"]
    with pytest.raises(ConfigError, match="lockstep"):
        lockstep(cfg)


# ---------------------------------------------------------------------------------------------- layout and report
def _fake_arm(d: Path, top1: list, lr_growth: float = 1.0):
    from bigexp.analysis.events import CompareLogger

    t = CompareLogger(d)
    for s in range(1, 5):
        t.scalars(s, {"train/loss": 2.0 / s, "opt/scale_invariant/applied_lr": 0.1 * lr_growth ** s,
                      "opt/scale_invariant/weight_norm": 3.0, "opt/plain/applied_lr": 0.1})
    for s, v in zip((2, 4), top1):
        t.scalars(s, {"val/top1": v, "val/top5": 90.0, "val/loss": 1.0})
    t.close()


def _fake_gap(d: Path, scale: float):
    from bigexp.run.metrics import TBLogger

    t = TBLogger(d)
    for s in (0, 2, 4):
        t.scalars(s, {"gap/max_abs_logit": scale * 10.0 ** s if s else 0.0, "gap/kl": scale ** 2 * s,
                      "gap/top1_agreement": 1.0})
    t.close()


def test_layout_has_one_chart_per_group_stat(tmp_path):
    from bigexp.analysis.events import read_layout, write_layout

    for arm in ("sgd", "expsgd"):
        _fake_arm(tmp_path / arm / "seed0", [50.0, 60.0])
    write_layout(tmp_path, "t")
    charts = {c.title: list(c.multiline.tag) for cat in read_layout(tmp_path).category for c in cat.chart}
    cats = [cat.title for cat in read_layout(tmp_path).category]
    assert "param group scale_invariant" in cats and "param group plain" in cats
    for tag in ("opt/scale_invariant/applied_lr", "opt/scale_invariant/log10_applied_lr",
                "opt/scale_invariant/weight_norm", "opt/plain/applied_lr"):
        group, stat = tag.split("/")[1:]
        assert charts[f"{group}: {stat}"] == [f"^{re.escape(tag)}$"], tag
    assert "val top-1 (%)" in charts   # the overlaid charts are still there


def test_report_seeds_and_control_against_raw_events(tmp_path):
    from bigexp.analysis.report import build_report

    top1 = {"sgd": {0: [40.0, 50.0], 1: [45.0, 53.0], 2: [44.0, 52.5]},
            "expsgd": {0: [41.0, 51.5], 1: [47.0, 52.0], 2: [40.0, 54.0]},
            "sgd_perturbed": {0: [40.0, 50.5], 1: [45.5, 53.0], 2: [44.0, 52.0]}}
    for arm, per in top1.items():
        for seed, vals in per.items():
            _fake_arm(tmp_path / arm / f"seed{seed}", vals)
    for seed in (0, 1, 2):
        _fake_gap(tmp_path / "gap" / f"seed{seed}", 1e-3)
        _fake_gap(tmp_path / "gap_control" / f"seed{seed}", 1e-6)
    res = build_report(tmp_path)
    assert [s.name for s in res.summaries][:3] == ["sgd/seed0", "sgd/seed1", "sgd/seed2"]
    text = res.text
    raw = {(arm, seed): _scalars_of(tmp_path / arm / f"seed{seed}")["val/top1"] for arm in top1 for seed in (0, 1, 2)}
    final = {k: v[max(v)] for k, v in raw.items()}
    best = {k: max(v.values()) for k, v in raw.items()}
    for arm in top1:
        f = [final[arm, s] for s in (0, 1, 2)]
        b = [best[arm, s] for s in (0, 1, 2)]
        assert (f"| {arm} | 0, 1, 2 | {statistics.mean(f):.2f} ± {statistics.stdev(f):.2f} | "
                f"{statistics.mean(b):.2f} ± {statistics.stdev(b):.2f} |") in text
    for arm in ("expsgd", "sgd_perturbed"):
        for label, vals in (("final top-1 %", final), ("best top-1 %", best)):
            diffs = [vals[arm, s] - vals["sgd", s] for s in (0, 1, 2)]
            m, hw = _interval(diffs)
            want = (f"no detectable difference ({m:+.2f} ± {hw:.2f} pp)" if abs(m) <= hw else
                    f"{arm} {'better' if m > 0 else 'worse'} by {abs(m):.2f} ± {hw:.2f} pp")
            row = (f"| {arm} − sgd | {label} | " + ", ".join(f"{d:+.2f}" for d in diffs)
                   + f" | [{m - hw:+.2f}, {m + hw:+.2f}] | {want} |")
            assert row in text, row
    # The departure table: R from the raw gap events, per seed.
    for seed in (0, 1, 2):
        tw = _scalars_of(tmp_path / "gap" / f"seed{seed}")
        co = _scalars_of(tmp_path / "gap_control" / f"seed{seed}")
        ratios = [tw["gap/max_abs_logit"][s] / co["gap/max_abs_logit"][s] for s in (2, 4)]
        r = math.sqrt(ratios[0] * ratios[1])
        assert f"| {seed} | max abs Δlogit | 2 | {r:.3g} |" in text
        assert f"twin departs faster than float noise (×{r:.3g})" in text
        assert f"| {seed} | 1 − top-1 agreement | 0 | — |" in text
    names = {p.name for p in res.plots}
    assert {"val_top1.png", "gap.png", "lr.png"} <= names


def test_band_plot_draws_the_mean_and_a_band(tmp_path, monkeypatch):
    import bigexp.analysis.plots as plots
    from bigexp.analysis.events import load_scalars

    for seed, vals in ((0, [40.0, 50.0]), (1, [44.0, 56.0])):
        _fake_arm(tmp_path / f"s{seed}", vals)
    seen = {}

    def capture(fig, path):
        ax = fig.axes[0]
        seen[path.name] = ({ln.get_label(): list(ln.get_ydata()) for ln in ax.get_lines()}, len(ax.collections))
        return path

    monkeypatch.setattr(plots, "save_figure_atomic", capture)
    plots.plot_compare_seeds({"sgd": [load_scalars(tmp_path / "s0"), load_scalars(tmp_path / "s1")]}, tmp_path)
    lines, bands = seen["val_top1.png"]
    assert lines == {"sgd (mean ± sd, 2 seeds)": [42.0, 53.0]} and bands == 1
    lines, _ = seen["lr.png"]
    assert set(lines) == {"sgd: plain (mean ± sd, 2 seeds)", "sgd: scale_invariant (mean ± sd, 2 seeds)"}


def test_array_tasks_cover_every_arm_and_seed_once_arm_major():
    """SLURM array task -> (arm, seed) (slurm/bigexp.sbatch, compare_array.sh). Would catch: a seed-major order
    the scripts' task count disagrees with, a seed dropped or repeated, --seed passed in a single-seed layout (its
    run directory <arm> would become <arm>/seed<s>), duplicate seeds accepted."""
    from bigexp.analysis.seeds import array_tasks
    from bigexp.errors import ConfigError

    assert array_tasks(["sgd", "expsgd"], [3, 5]) == [("sgd", 3), ("sgd", 5), ("expsgd", 3), ("expsgd", 5)]
    assert array_tasks(["sgd", "expsgd"], []) == array_tasks(["sgd", "expsgd"], [7]) == [("sgd", None),
                                                                                     ("expsgd", None)]
    with pytest.raises(ConfigError, match="compare.seeds"):
        array_tasks(["sgd"], [1, 2, 1])


# ---------------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_compare_cli_with_seeds_and_control(tmp_path, tmp_path_factory):
    """`bigexp compare` (its function, in this process: a child would pay ~30 s of imports again) with
    compare.seeds=[0,1] and compare.control=true on the tiny config of test_compare.py: every arm for every seed,
    the control nudged at step 0, both gap runs, the report's numbers from the events."""
    from bigexp.analysis.runner import compare
    from bigexp.config import load_config
    from test_compare import small_data, small_overrides

    data = small_data(tmp_path_factory.getbasetemp() / "shared_compare")
    cfg = load_config(str(REPO / "configs/fmnist/base.yaml"), small_overrides(data, tmp_path, "sc")
                      + ["compare.seeds=[0,1]", "compare.control=true", "log.plots=false"])
    res = compare(cfg)
    logdir = tmp_path / "sc"
    assert set(res.gaps) == {"gap/seed0", "gap/seed1", "gap_control/seed0", "gap_control/seed1"}
    for run in ("sgd", "expsgd", "sgd_perturbed", "gap", "gap_control"):
        assert sorted(p.name for p in (logdir / run).iterdir() if p.is_dir()) == ["seed0", "seed1"], run
    # Seeds differ; within a seed the control starts from the baseline's weights nudged by ~1e-7 relative.
    p = {(a, s): torch.load(logdir / a / f"seed{s}/probes/step_00000000.pt", weights_only=True)
         for a in ("sgd", "expsgd", "sgd_perturbed") for s in (0, 1)}
    assert not torch.equal(p["sgd", 0]["logits"], p["sgd", 1]["logits"])
    for s in (0, 1):
        assert torch.equal(p["sgd", s]["logits"], p["expsgd", s]["logits"])
        for n, w in p["sgd", s]["weights"].items():
            v = p["sgd_perturbed", s]["weights"][n]
            assert float((v - w).abs().max()) <= 1e-6 * float(w.abs().max()) + 1e-12, n
        assert any(not torch.equal(p["sgd_perturbed", s]["weights"][n], w) for n, w in p["sgd", s]["weights"].items())
        gc = _scalars_of(logdir / f"gap_control/seed{s}")
        assert 0.0 < gc["gap/max_abs_logit"][0] < 1e-4
        assert set(gc["gap/kl"]) == set(_scalars_of(logdir / f"gap/seed{s}")["gap/kl"]) == {0, 2, 4}
    text = (logdir / "report.md").read_text()
    f = {(a, s): _scalars_of(logdir / a / f"seed{s}")["val/top1"] for a in ("sgd", "expsgd") for s in (0, 1)}
    fin = {k: v[max(v)] for k, v in f.items()}
    diffs = [fin["expsgd", s] - fin["sgd", s] for s in (0, 1)]
    m = statistics.mean(diffs)
    assert f"| expsgd − sgd | final top-1 % | {diffs[0]:+.2f}, {diffs[1]:+.2f} |" in text
    sgd_f = [fin["sgd", 0], fin["sgd", 1]]
    assert f"| sgd | 0, 1 | {statistics.mean(sgd_f):.2f} ± {statistics.stdev(sgd_f):.2f} |" in text
    if statistics.stdev(diffs) > 0:
        assert f"{abs(m):.2f} ± {_interval(diffs)[1]:.2f} pp" in text
    assert "### Twin vs float noise" in text and "| 1 | max abs Δlogit |" in text
    assert (logdir / "plots/gap.png").is_file() and (logdir / "plots/val_top1.png").is_file()
