"""bigexp.optim.build.group_stats (both arms' logged norms) and the config rules of the expsgd arm (issue 17)."""
import math

import pytest
import torch

from bigexp.config import Config, ConfigError, validate
from bigexp.optim.build import group_stats


def _sgd(tensors, lr=0.1):
    return torch.optim.SGD([{"params": [t]} for t in tensors], lr=lr, momentum=0.9)


def test_baseline_group_stats_sum_the_shards_with_norm_reduce():
    """ZeRO 1 with two ranks: each rank's SGD holds one flat shard per group. With a (fake) SUM all-reduce both
    'ranks' log the whole group's norm, which rank 0's shard alone does not give."""
    torch.manual_seed(0)
    whole = [torch.randn(50, dtype=torch.float64), torch.randn(7, dtype=torch.float64)]
    shards = [[w[:20].clone() for w in whole], [w[20:].clone() for w in whole]]
    local = [torch.stack([s.pow(2).sum() for s in rank]) for rank in shards]
    fake_reduce = lambda v: local[0] + local[1]  # noqa: E731  - what the all-reduce of every rank's vector gives
    ref = group_stats(_sgd(whole), ["a", "b"])
    for rank in shards:
        opt = _sgd(rank)
        opt.norm_reduce = fake_reduce  # as bigexp.run.engine sets it when the masters are sharded
        st = group_stats(opt, ["a", "b"])
        for name in ("a", "b"):
            assert st[f"opt/{name}/weight_norm"] == pytest.approx(ref[f"opt/{name}/weight_norm"], rel=1e-14)
            assert st[f"opt/{name}/effective_lr"] == pytest.approx(ref[f"opt/{name}/effective_lr"], rel=1e-14)
        explicit = group_stats(_sgd(rank), ["a", "b"], norm_reduce=fake_reduce)
        assert explicit == st
    alone = group_stats(_sgd(shards[0]), ["a", "b"])  # no reduce: the shard's norm (what rank 0 logged)
    assert alone["opt/a/weight_norm"] < 0.9 * ref["opt/a/weight_norm"]
    assert ref["opt/a/weight_norm"] == pytest.approx(float(whole[0].norm()), rel=1e-14)


def _expsgd_cfg(**optim):
    cfg = Config()
    cfg.optim.optimizer = "expsgd"
    for k, v in optim.items():
        setattr(cfg.optim, k, v)
    return cfg


def test_expsgd_refuses_gradient_clipping_naming_the_keys():
    cfg = _expsgd_cfg()
    cfg.engine.gradient_clipping = 1.0
    with pytest.raises(ConfigError, match=r"engine.gradient_clipping = 1.0 \(default\).*optim.optimizer = 'expsgd'"):
        validate(cfg)
    cfg.optim.optimizer = "sgd"  # the baseline may clip
    validate(cfg)


def test_expsgd_needs_a_band_a_power_of_two_renormalisation_can_reach():
    with pytest.raises(ConfigError, match=r"optim.renorm_band = 1.2 .*must be >= sqrt\(2\)"):
        validate(_expsgd_cfg(renorm_band=1.2))
    validate(_expsgd_cfg(renorm_band=math.sqrt(2.0)))


def test_exact_twin_refuses_compile_naming_both_keys():
    cfg = _expsgd_cfg(twin="exact")
    cfg.engine.compile = True
    with pytest.raises(ConfigError, match=r"optim.twin = 'exact' \(default\).*engine.compile = true") as e:
        validate(cfg)
    assert "recompile" in str(e.value)
    validate(_expsgd_cfg(twin="native"))   # native compiles: its eps never changes
    cfg.engine.compile = False
    validate(cfg)


def model_modules(model, names):
    return [(n, m) for n, m in model.named_modules() if n in names]


@pytest.mark.usefixtures("one_thread")
def test_build_optimizer_installs_the_exact_twin_on_the_expsgd_arm_only():
    """exact: an attached ExactTwin is the renorm hook (no renorm-only rescaler beside it) and moves every BN's eps
    to eps0 * A**-2 after a step; native keeps eps; the sgd arm ignores the key. Would fail if build dropped the key,
    installed both hooks, or left the twin unattached."""
    from bigexp.models import build_model
    from bigexp.optim.build import build_optimizer

    def one_step(optimizer, twin):
        cfg = _expsgd_cfg(twin=twin, optimizer=optimizer)
        cfg.model.width = 4
        torch.manual_seed(0)
        model = build_model(cfg.model)
        x = torch.randn(4, 3, 16, 16)
        built = build_optimizer(cfg, model, x)
        torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 3])).backward()
        built.optimizer.step()
        bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        return built, bns

    built, bns = one_step("expsgd", "exact")
    assert built.twin is not None and built.on_renorm == built.twin.on_renorm
    g = next(g for g in built.optimizer.param_groups if g["scale_invariant"])
    log_a = g["exp_log_A"] + g["exp_log_A_lo"] + g["exp_log2_A"] * math.log(2.0)
    absorbing = {st["name"] for st in built.twin.state()}
    assert len(absorbing) >= 3
    for name, m in model_modules(built.twin.model, absorbing):
        assert m.eps == pytest.approx(1e-5 * math.exp(-2 * log_a), rel=1e-12), name
    assert log_a < 0
    built, bns = one_step("expsgd", "native")
    assert built.twin is None and all(m.eps == 1e-5 for m in bns)
    built, bns = one_step("sgd", "exact")
    assert built.twin is None and type(built.optimizer) is torch.optim.SGD and all(m.eps == 1e-5 for m in bns)
