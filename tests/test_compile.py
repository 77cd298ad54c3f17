"""`engine.compile: true`: the model compiled in place by DeepSpeed's engine.compile (bigexp/run/engine.py).

Real one-process CPU runs of train() (DeepSpeed on gloo), both arms, with renormalisation every 3 steps, an eval at
each epoch end and a resume. The backend is a counting wrapper around dynamo's eager one (BIGEXP_COMPILE_BACKEND):
dynamo's tracing and guards as under inductor, without minutes of C++ compilation, and bitwise the eager numbers,
so a compiled run can be compared with an uncompiled one exactly.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch._dynamo

from conftest import fmnist_betons
from test_loop_syncs import inprocess_cfg
from bigexp.run.engine import COMPILE_BACKEND_ENV

TRAIN = 128
STEPS_PER_EPOCH = TRAIN // 32
VAL_BATCHES = 2   # 40 val images in batches of 32: the second, of 8, is a new shape (one more graph, then dynamic)


class Counting:
    """A dynamo backend that runs each captured graph eagerly and counts graphs made and compiled calls."""

    def __init__(self):
        self.graphs = 0
        self.calls = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        self.graphs += 1

        def run(*args):
            self.calls += 1
            return gm.forward(*args)
        return run


COUNTING = Counting()
torch._dynamo.register_backend(COUNTING, name="bigexp_test_counting")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return fmnist_betons(tmp_path_factory.mktemp("compiledata"), train=TRAIN, val=40)


@pytest.fixture
def counting_backend(monkeypatch):
    monkeypatch.setenv(COMPILE_BACKEND_ENV, "bigexp_test_counting")
    torch._dynamo.reset()  # no graph cached by an earlier test: each test counts its own
    COUNTING.graphs = COUNTING.calls = 0
    return COUNTING


def _run(tmp_path, data, arm, name, *overrides):
    """train() of one arm, 2 epochs of 4 steps, renormalisation every 3 steps, eval and checkpoint per epoch:
    (result, [graphs made before each step's hook])."""
    from bigexp.run.loop import train

    cfg = inprocess_cfg(tmp_path, data, name, f"optim.optimizer={arm}", "optim.renorm_every=3", *overrides)
    graphs = []
    result = train(cfg, step_hook=lambda step, engine: graphs.append(COUNTING.graphs))
    return result, graphs


def _final_module(tmp_path: Path, name: str) -> dict:
    ckpt = sorted((tmp_path / name / "checkpoints").glob("step*"))[-1]
    return torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]


@pytest.mark.parametrize("arm,swap", [("sgd", False), ("expsgd", True)])
def test_compiled_run_neither_recompiles_per_step_nor_changes_checkpoints(arm, swap, data, tmp_path,
                                                                          counting_backend):
    """Compiled for the first epoch (+ an eval) and resumed: the steady-state steps make no new graph, every
    training forward goes through the compiled graph, the checkpoint loads into an uncompiled model. swap (the
    exp-LR arm, whose renormalisation rescales weights in place; sgd skips it to keep CI short): resumed
    uncompiled instead, and a run uncompiled first resumed compiled: the two end bitwise equal (each step ran
    compiled in one and eagerly in the other).
    Would catch: engine.compile ignored (no compiled call), a per-step recompile (an LR, step count or renorm
    factor reaching the graph as a constant), `_orig_mod.` keys from a torch.compile wrapper (the uncompiled
    resume refuses the checkpoint), a compiled step that computes something else (weights differ)."""
    from bigexp.models import build_model

    # compiled, then resumed from its checkpoint uncompiled
    res, graphs = _run(tmp_path, data, arm, "c_then_e", "engine.compile=true", f"run.max_steps={STEPS_PER_EPOCH}")
    assert res.global_step == STEPS_PER_EPOCH
    # one graph at the first step (train mode); every training forward and one eval pass (2 batches) through it
    assert graphs[1:] == [1] * STEPS_PER_EPOCH, graphs
    assert counting_backend.calls == STEPS_PER_EPOCH + VAL_BATCHES
    assert counting_backend.graphs <= 3  # + eval mode, + the last val batch's shape
    module = _final_module(tmp_path, "c_then_e")
    assert not [k for k in module if "_orig_mod" in k]
    uncompiled = build_model(inprocess_cfg(tmp_path, data, "x").model)
    uncompiled.load_state_dict(module, strict=True)   # a compiled run's weights in an uncompiled model
    calls, graphs_before = counting_backend.calls, counting_backend.graphs
    if not swap:  # resumed compiled: the cached graphs serve it
        _run(tmp_path, data, arm, "c_then_e", "engine.compile=true")
        assert counting_backend.graphs == graphs_before
        assert counting_backend.calls - calls == STEPS_PER_EPOCH + VAL_BATCHES
        return
    _run(tmp_path, data, arm, "c_then_e", "engine.compile=false")
    assert counting_backend.calls == calls              # resumed uncompiled: no compiled call

    # uncompiled, then resumed compiled: the graphs cached above serve it, none is made per step
    _run(tmp_path, data, arm, "e_then_c", "engine.compile=false", f"run.max_steps={STEPS_PER_EPOCH}")
    assert counting_backend.calls == calls
    graphs_before, calls = counting_backend.graphs, counting_backend.calls
    res, graphs = _run(tmp_path, data, arm, "e_then_c", "engine.compile=true")
    assert res.global_step == 2 * STEPS_PER_EPOCH
    assert counting_backend.graphs == graphs_before and len(set(graphs)) == 1, (graphs_before, graphs)
    assert counting_backend.calls - calls == STEPS_PER_EPOCH + VAL_BATCHES
    assert _equal(_final_module(tmp_path, "e_then_c"), _final_module(tmp_path, "c_then_e"))


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_new_norm_eps_every_step_recompiles_every_step(counting_backend):
    """Why optim.twin = exact refuses engine.compile (bigexp.config.validate; tested in test_optim_build.py): the
    exact twin writes a new Python-float eps into the norm layers after every step, and dynamo guards on it, so
    every step would make a new graph (until dynamo's cache limit, then silently eager). If a torch release stops
    specialising on it, this fails and the refusal can go."""
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    m.compile(backend="bigexp_test_counting")
    x = torch.randn(2, 3, 8, 8)
    for i in range(4):
        m[1].eps = 1e-5 * (1 + i)
        m(x).sum().backward()
    assert counting_backend.graphs == 4
