"""Device->host syncs per ExpSGD.step (project issue 14): none in a steady-state step that neither renormalises
nor is logged. On CPU there is no real sync, so every way a tensor's value reaches Python is counted instead
(.item, .tolist, float(), int(), bool(), .numpy()): on a GPU each would block on the stream."""
import contextlib
import traceback
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from bigexp.optim.expsgd import ExpSGD

READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "numpy")


@contextlib.contextmanager
def count_reads(with_site: bool = False):
    """Yields the list of reads made inside the block: the method name, and with_site the first caller outside
    torch (`item step.py:42 train_step`), so a failing count names the line."""
    calls = []
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def wrap(name, fn):
        def counted(self, *a, **kw):
            if with_site:
                site = next(f for f in reversed(traceback.extract_stack()[:-1]) if "/torch/" not in f.filename)
                calls.append(f"{name} {Path(site.filename).name}:{site.lineno} {site.name}")
            else:
                calls.append(name)
            return fn(self, *a, **kw)
        return counted

    for name, fn in originals.items():
        setattr(torch.Tensor, name, wrap(name, fn))
    try:
        yield calls
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)


def _opt(**kw):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 16, bias=False), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 3))
    opt = ExpSGD([{"params": [net[0].weight], "scale_invariant": True, "weight_decay": 5e-3},
                  {"params": list(net[1].parameters()) + list(net[3].parameters()), "weight_decay": 1e-4}],
                 lr=0.1, **kw)
    for p in net.parameters():
        p.grad = torch.randn_like(p) * 1e-2
    return opt


def _reads_per_step(opt, steps):
    out = []
    for _ in range(steps):
        with count_reads() as calls:
            opt.step()
        out.append(len(calls))
    return out


@pytest.mark.parametrize("fused", [False, True])
def test_steady_state_steps_read_nothing_back(fused):
    opt = _opt(renorm_every=10, renorm_band=16.0, fused=fused)  # the defaults' shape: a clock and a band
    reads = _reads_per_step(opt, 30)
    assert reads[0] == 1  # the first step reads n0
    ticks = [i for i in range(1, 30) if (i + 1) % 10 == 0]  # steps 10, 20, 30 of the group: renormalise
    assert [i for i in range(1, 30) if reads[i]] == ticks and all(reads[i] == 1 for i in ticks)
    with count_reads() as calls:
        opt.group_stats()  # a log step: the norms, one read for all groups
    assert len(calls) == 1
    with count_reads() as calls:
        opt.group_stats()  # nothing stepped since: the norms are known
    assert not calls


def test_band_without_a_clock_is_read_every_band_check_every_steps():
    every_step = _reads_per_step(_opt(renorm_every=None, renorm_band=16.0), 12)
    assert every_step == [2] + [1] * 11  # n0 + the band, then the band: one read a step (the documented cost)
    sparse = _reads_per_step(_opt(renorm_every=None, renorm_band=16.0, band_check_every=4), 12)
    assert sparse == [1, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1]
    assert _reads_per_step(_opt(renorm_every=None, renorm_band=None), 12) == [1] + [0] * 11
