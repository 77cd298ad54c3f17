"""ExpSGD's renormalisation is lossless (project issue 12) and its logged effective LR has no tooth (issue 17.6).

Power-of-two renormalisation factors make every rescaling exact in binary floating point, so a run renormalised
every k steps is BITWISE the run without renormalisation, up to the exact factor 2**E, in fp32 and bf16 -- with
norm layers whose eps is below rounding (eps = 1e-30): what remains in native mode is eps, shown below too.
"""
import math

import pytest
import torch
import torch.nn as nn

from bigexp.optim.expsgd import ExpSGD

STEPS = 60


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # and one reduction order: bitwise comparisons need the same kernels
    yield
    torch.set_num_threads(n)


def _net(norm: str, eps: float, dtype):
    layer = {"bn": lambda: nn.BatchNorm2d(6, eps=eps), "gn": lambda: nn.GroupNorm(2, 6, eps=eps),
             "ln": lambda: nn.LayerNorm([6, 8, 8], eps=eps)}[norm]
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), layer(), nn.ReLU(),
                         nn.Conv2d(6, 6, 3, padding=1, bias=False), layer(), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5)).to(dtype)


def _run(norm, eps, dtype, renorm_every, callback=None):
    """60 steps of ExpSGD with a large lr*wd (log A ~ -3: the weights grow ~20x, so renormalisations divide
    by 2, 4, ... for real, not by 1)."""
    net = _net(norm, eps, dtype)
    inv = [net[0].weight, net[3].weight]
    plain = [p for p in net.parameters() if all(p is not q for q in inv)]
    opt = ExpSGD([{"params": [inv[0]], "scale_invariant": True}, {"params": [inv[1]], "scale_invariant": True},
                  {"params": plain, "weight_decay": 1e-4}], lr=0.5, momentum=0.9, weight_decay=5e-3,
                 renorm_every=renorm_every, renorm_band=None)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 3, 8, 8, generator=g).to(dtype), torch.randint(0, 5, (64,), generator=g)
    for t in range(STEPS):
        opt.zero_grad(set_to_none=True)
        idx = slice(8 * (t % 8), 8 * (t % 8) + 8)
        nn.functional.cross_entropy(net(x[idx]).float(), y[idx]).backward()
        opt.step()
        if callback:
            callback(opt)
    return net, opt, x


@pytest.mark.parametrize("norm,dtype", [("bn", torch.float32), ("gn", torch.float32), ("ln", torch.bfloat16),
                                        ("bn", torch.bfloat16)])
def test_renormalisation_is_bitwise_lossless(norm, dtype):
    free_net, free, x = _run(norm, 1e-30, dtype, renorm_every=None)
    ren_net, ren, _ = _run(norm, 1e-30, dtype, renorm_every=3)
    for i, (a, b) in enumerate(((free_net[0].weight, ren_net[0].weight), (free_net[3].weight, ren_net[3].weight))):
        e = ren.exp_state(i)["log2_A"] - free.exp_state(i)["log2_A"]  # the renormalisations' total exponent
        assert e >= 1 and ren.exp_state(i)["renorm_count"] == STEPS // 3  # they really divided (by 2 or more)
        assert torch.equal(b.detach() * 2.0 ** e, a.detach())
        assert torch.equal(ren.state[b]["momentum_buffer"], free.state[a]["momentum_buffer"] * 2.0 ** e)
    for a, b in zip(list(free_net[8].parameters()), list(ren_net[8].parameters())):
        assert torch.equal(a, b)  # the plain classifier never saw a difference
    with torch.no_grad():  # train mode: batch statistics, the network function
        assert torch.equal(free_net(x[:16]), ren_net(x[:16]))


def test_what_is_left_is_the_norm_eps():
    # the same pair with BatchNorm's default eps: BN(x/c; eps) = BN(x; c^2 eps), so the runs differ (and this
    # large-lr net amplifies the difference: no useful upper bound, only that it is not zero)
    free_net, _, x = _run("bn", 1e-5, torch.float32, renorm_every=None)
    ren_net, _, _ = _run("bn", 1e-5, torch.float32, renorm_every=3)
    with torch.no_grad():
        gap = float((free_net(x[:16]) - ren_net(x[:16])).abs().max())
    assert gap > 0.0


def test_effective_lr_has_no_tooth_at_renormalisations():
    """opt/*/effective_lr = applied LR / |w|^2 with both in one scale: the renormalised run logs the very curve of
    the run without renormalisation (before the fix, the LR applied before a renormalisation was divided by
    the norm after it: a factor c^2 ~ 4 tooth at every renormalisation)."""
    series = {}
    for every in (None, 5):
        rows = []
        _run("gn", 1e-30, torch.float64, renorm_every=every,
             callback=lambda o: rows.append([s["effective_lr"] for s in o.group_stats()[:2]]))
        series[every] = rows
    flat = [v for row in series[None] for v in row]
    assert all(math.isfinite(v) and v > 0 for v in flat)
    assert [v for row in series[5] for v in row] == pytest.approx(flat, rel=1e-12)
