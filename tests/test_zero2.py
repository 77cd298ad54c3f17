"""ZeRO 2 (gradients sharded too) runs like ZeRO 1; ZeRO 3 is refused with its reason.

The engine-level checks of ZeRO 2 sit with the other modes: ranks identical, twin = baseline, renormalisation on the
flat partitions (tests/test_train_dist.py, tests/dist/engine_modes.py), its state bitwise across a resume on the same
and on another world size (tests/test_world_size_resume.py). Here: the config, and `bigexp train` stopped mid-epoch
and resumed, bitwise the uninterrupted run.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from conftest import fmnist_betons, run_group, torchrun_cmd, train_args

from bigexp.config import ConfigError, load_config, validate
from bigexp.run.engine import deepspeed_config


def fmnist(*overrides: str):
    return load_config("configs/fmnist/base.yaml", ["optim.optimizer=expsgd", "data.batch_size=32", *overrides])


def test_zero_2_is_accepted_and_reaches_deepspeed():
    cfg = fmnist("engine.zero_stage=2", "engine.precision=bf16")
    validate(cfg, world_size=2)
    ds = deepspeed_config(cfg, world_size=2)
    assert ds["zero_optimization"] == {"stage": 2}
    # bf16 + ZeRO 2 stays on DeepSpeed's ZeRO optimizer: fp32 accumulation would be BF16_Optimizer's (stage 1) switch
    assert "grad_accum_dtype" not in ds["data_types"]


def test_zero_3_is_refused_with_its_reason():
    with pytest.raises(ConfigError) as err:
        validate(fmnist("engine.zero_stage=3"), world_size=2)
    msg = str(err.value)
    assert "engine.zero_stage = 3" in msg and "partitions the weights themselves" in msg
    assert "renormalisation" in msg and "use 2" in msg
    with pytest.raises(ConfigError, match="engine.zero_stage = 4"):
        fmnist("engine.zero_stage=4")


def checkpoint_state(ckpt: Path) -> dict:
    """Every tensor DeepSpeed and bigexp wrote into one checkpoint directory, by file and key path."""
    out = {}

    def walk(prefix, v):
        if torch.is_tensor(v):
            out[prefix] = v
        elif isinstance(v, dict):
            for k, x in v.items():
                walk(f"{prefix}/{k}", x)
        elif isinstance(v, (list, tuple)):
            for i, x in enumerate(v):
                walk(f"{prefix}/{i}", x)

    for f in sorted(ckpt.glob("*.pt")):
        walk(f.name, torch.load(f, map_location="cpu", weights_only=False))
    return out


@pytest.mark.slow
def test_a_zero_2_run_stopped_mid_epoch_and_resumed_ends_bitwise_as_the_uninterrupted_one(tmp_path):
    """One 2-rank run checkpoints mid-epoch (step 3) and at its end (step 8); a copy keeping only the step-3
    checkpoint is resumed: the step-8 checkpoints (weights, masters and momentum shards, scheduler, exp-LR state,
    BN buffers, RNG) must be the same bits."""
    data = fmnist_betons(tmp_path / "data", train=256, val=64)

    def cmd(out: Path):
        return torchrun_cmd(train_args("configs/fmnist/main.yaml", out, data, "z2", "run.epochs=1",
                                       "data.batch_size=32", "data.random_crop=true", "model.width=8",
                                       "optim.optimizer=expsgd", "optim.renorm_every=2", "engine.zero_stage=2",
                                       "schedule.kind=cosine", "run.checkpoint_every_steps=3", "run.keep_checkpoints=5",
                                       "log.plots=false", "log.every_steps=4", "data.num_workers=1"))

    proc = run_group(cmd(tmp_path / "a"), timeout=600)
    assert proc.returncode == 0, proc.stdout[-8000:]
    ckpts = tmp_path / "a" / "z2" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == ["step000000003", "step000000006", "step000000008"]
    shutil.copytree(tmp_path / "a" / "z2", tmp_path / "b" / "z2")
    for tag in ("step000000006", "step000000008"):
        shutil.rmtree(tmp_path / "b" / "z2" / "checkpoints" / tag)
    proc = run_group(cmd(tmp_path / "b") + ["--resume", "auto"], timeout=600)
    assert proc.returncode == 0, proc.stdout[-8000:]
    assert "resumed from" in proc.stdout and "at step 3 (epoch 0, batch 3)" in proc.stdout
    want = checkpoint_state(ckpts / "step000000008")
    got = checkpoint_state(tmp_path / "b" / "z2" / "checkpoints" / "step000000008")
    assert any("zero_pp_rank_1" in k for k in want), sorted(want)[:20]
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), f"{k} differs after stop + resume"


def test_zero_buckets_are_the_model_size_not_two_gigabytes():
    # DeepSpeed's default 5e8-element bucket was allocated every micro-step on CPU and NaN-filled under
    # run.deterministic (0.23 s a step for a 78k-parameter net); a model-sized bucket reduces in the same one piece.
    from bigexp.run.engine import ZERO_DEFAULT_BUCKET

    cfg = fmnist("engine.zero_stage=1")
    ds = deepspeed_config(cfg, world_size=2, model_numel=78_042)
    assert ds["zero_optimization"] == {"stage": 1, "reduce_bucket_size": 78_042, "allgather_bucket_size": 78_042}
    assert deepspeed_config(cfg, world_size=2, model_numel=10**10)["zero_optimization"]["reduce_bucket_size"] == \
        ZERO_DEFAULT_BUCKET
    assert deepspeed_config(fmnist(), world_size=1, model_numel=78_042)["zero_optimization"] == {"stage": 0}
