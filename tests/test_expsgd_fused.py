"""ExpSGD(fused=True): torch's fused SGD kernel for both kinds of group (project issue 14).

Plain groups must be torch.optim.SGD(fused=True) bitwise; invariant groups the foreach step to round-off (the
fused kernel keeps v*gamma + g in fp32 registers before rounding once, foreach rounds after each op). On CPU
torch's fused SGD once skipped bf16/fp16 updates silently: a bf16 param must really change here.
"""
import copy

import pytest
import torch
import torch.nn as nn

from bigexp.optim.expsgd import ExpSGD

STEPS = 20


def _net(dtype):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16, bias=False), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 3)).to(dtype)


def _groups(net):
    return [{"params": [net[0].weight], "scale_invariant": True, "weight_decay": 5e-3},
            {"params": list(net[1].parameters()) + list(net[3].parameters()), "weight_decay": 1e-4}]


def _train(net, opt, dtype, steps=STEPS):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 12, generator=g).to(dtype), torch.randint(0, 3, (64,), generator=g)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(net(x).float(), y).backward()
        opt.step()


def _fixed_grad_steps(net, opt, steps=STEPS):
    """Steps with fixed random gradients: the kernels compared alone, no training dynamics to amplify round-off."""
    g = torch.Generator().manual_seed(2)
    grads = [(torch.randn(p.shape, generator=g) * 0.1).to(p.dtype) for p in net.parameters()]
    for _ in range(steps):
        for p, gr in zip(net.parameters(), grads):
            p.grad = gr.clone()
        opt.step()


# bf16: foreach rounds to bf16 after the momentum multiply and again after each add, fused once per step: up to
# ~1 bf16 ulp (2**-8 of |p|) apart per step, so <= STEPS * 2**-8 * max|p| after STEPS steps
@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-5), (torch.bfloat16, STEPS * 2.0 ** -8)])
def test_fused_matches_foreach(dtype, rtol):
    nets = {k: _net(dtype) for k in ("fused", "foreach")}
    start = [p.detach().clone() for p in nets["fused"].parameters()]
    opts = {k: ExpSGD(_groups(n), lr=0.2, renorm_every=5, fused=(k == "fused"), foreach=(k == "foreach"))
            for k, n in nets.items()}
    for k in nets:
        _fixed_grad_steps(nets[k], opts[k])
    for p0, a, b in zip(start, nets["fused"].parameters(), nets["foreach"].parameters()):
        assert a.dtype == dtype
        assert not torch.equal(a, p0)  # the fused kernel really updated it (CPU bf16 once silently did not)
        moved = float((b.float() - p0.float()).abs().max())
        gap = float((a.float() - b.float()).abs().max())
        assert gap <= rtol * float(b.float().abs().max()) and gap < 0.1 * moved, (gap, moved)
    for i in (0, 1):  # the same exponential LR and renormalisations (c is a power of two: robust to round-off)
        f, e = opts["fused"].exp_state(i), opts["foreach"].exp_state(i)
        assert (f["applied_lr"], f["log2_A"], f["renorm_count"]) == (e["applied_lr"], e["log2_A"], e["renorm_count"])
    assert opts["fused"].exp_state(0)["log2_A"] != 0  # a renormalisation really divided by a power of two


def test_plain_groups_are_torch_fused_sgd_bitwise():
    net = _net(torch.float32)
    net2 = copy.deepcopy(net)
    groups = lambda n: [{"params": list(n.parameters()), "weight_decay": 1e-3}]  # noqa: E731
    _train(net, torch.optim.SGD(groups(net), lr=0.1, momentum=0.9, fused=True), torch.float32)
    _train(net2, ExpSGD(groups(net2), lr=0.1, momentum=0.9, fused=True), torch.float32)
    for a, b in zip(net.parameters(), net2.parameters()):
        assert torch.equal(a, b)


def test_fused_refuses_params_it_has_no_kernel_for():
    with pytest.raises(RuntimeError, match="fused=True needs floating params"):
        ExpSGD([torch.zeros(3, dtype=torch.int64)], lr=0.1, fused=True)
