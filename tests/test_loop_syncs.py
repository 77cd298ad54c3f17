"""Device->host syncs per training step of the real loop (project issue 14): at most one (the ranks' NaN/stop
agreement, bigexp.run.step.train_step) in a steady-state step, one that is not logged, not checkpointed, does not
renormalise and does not start or end an epoch.

One process, CPU, fp32 (DeepSpeed's fp32 step reads nothing back, so every read counted is the loop's). On CPU
there is no real sync, so every way a tensor's value reaches Python is counted (tests/test_host_syncs.py's READS):
on a GPU each blocks on the stream. Each read is recorded with its call site, so a failure names the line.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import REPO, fmnist_betons
from test_host_syncs import count_reads

BASE = str(REPO / "configs" / "fmnist" / "base.yaml")


def inprocess_cfg(out: Path, data: Path, name: str, *overrides: str):
    """A tiny one-process CPU run of configs/fmnist/base.yaml on fmnist_betons(data): 2 epochs, width 4, fp32,
    nothing logged but the last step, no TensorBoard, no plots (tests/test_grad_accum.py and
    tests/test_device_discipline.py use it too)."""
    from bigexp.config import load_config

    return load_config(BASE, [
        f"run.out_dir={out}", f"run.name={name}", "run.progress=false", "run.epochs=2", "run.threads=1",
        f"data.train_beton={data / 'train.beton'}", f"data.val_beton={data / 'val.beton'}", "data.write_missing=false",
        "data.num_workers=1", "data.batch_size=32", "model.width=4", "engine.precision=fp32",
        "log.every_steps=100000", "log.tensorboard=false", "log.plots=false", *overrides])


def recorded_reads():
    """Every tensor read while active, as 'name file:line function' of the first frame outside torch."""
    return count_reads(with_site=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return fmnist_betons(tmp_path_factory.mktemp("syncdata"), train=256, val=32)


@pytest.mark.parametrize("arm,grad_accum", [("expsgd", 1), ("sgd", 3)])
def test_steady_state_step_reads_back_at_most_once(arm, grad_accum, data, tmp_path):
    from bigexp.run.loop import train

    # expsgd: its clock never ticks in this run (renorm_every), so its steady steps read nothing themselves.
    cfg = inprocess_cfg(tmp_path, data, "syncs", f"optim.optimizer={arm}", "optim.renorm_every=100000",
                        f"engine.grad_accum={grad_accum}", f"data.batch_size={32 * grad_accum}",
                        "run.checkpoint_every_steps=100000")
    spans = {}  # step -> the reads between the previous step's hook and this one's: this step's work
    with recorded_reads() as calls:
        def hook(step, engine):
            spans[step] = list(calls)
            calls.clear()
        result = train(cfg, step_hook=hook)
    per_epoch = 256 // (32 * grad_accum)
    assert result.global_step == 2 * per_epoch
    # Not steady: step 0 (the hook before training), the first step of each epoch (loader start, ExpSGD's first
    # norm read), the last step (logged, after it is hooked: its reads land in no span here).
    firsts = {1 + e * per_epoch for e in range(2)}
    steady = {s: r for s, r in spans.items() if s > 0 and s not in firsts}
    assert len(steady) >= 2 * per_epoch - 3
    too_many = {s: r for s, r in steady.items() if len(r) > 1}
    assert not too_many, f"steady-state steps reading back more than once: {too_many}"
    assert all(len(r) == 1 and "train_step" in r[0] for r in steady.values()), steady  # the agreement's read
