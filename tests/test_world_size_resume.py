"""A checkpoint written on N ranks resumes on M != N: optimizer state resharded (bigexp/run/reshard.py), and the
interrupted epoch continues at the same place of a world-size-independent global sample order."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import REPO, fmnist_betons, run_group, torchrun_cmd

from bigexp.data.loaders import train_batches_per_epoch, train_epoch_indices
from bigexp.errors import CheckpointError
from bigexp.run.reshard import reshard, shard_files, unpadded_length


# ----------------------------------------------------------------------------------------------- the global order
def consumed(n: int, *, world: int, micro_global: int, seed: int, epoch: int, start: int, stop: int | None) -> list:
    """Sample indices all `world` ranks take in micro-batches [start, stop) of an epoch, one list per micro-batch:
    what the training loop takes with batch_in_epoch = start (its position counts micro-batches, per rank)."""
    b = micro_global // world
    shards = [train_epoch_indices(n, seed=seed, epoch=epoch, rank=r, world_size=world, batch_size=b)
              for r in range(world)]
    stop = train_batches_per_epoch(n, b, world) if stop is None else stop
    return [sorted(int(i) for s in shards for i in s[k * b:(k + 1) * b]) for k in range(start, stop)]


@pytest.mark.parametrize("old,new", [(2, 1), (1, 2), (2, 4), (4, 3), (3, 6)])
def test_a_resume_on_another_world_size_takes_each_sample_of_the_epoch_once(old, new):
    """Global micro-batch k is the same samples on every world size, so stopping after k on `old` ranks and going on
    from k on `new` ranks covers the epoch once, batch for batch as one uninterrupted run on either."""
    n, micro_global, seed, epoch = 197, 12, 5, 3   # 197: a tail that fills no global micro-batch is dropped
    full = consumed(n, world=old, micro_global=micro_global, seed=seed, epoch=epoch, start=0, stop=None)
    assert full == consumed(n, world=new, micro_global=micro_global, seed=seed, epoch=epoch, start=0, stop=None)
    for k in range(len(full) + 1):
        spliced = (consumed(n, world=old, micro_global=micro_global, seed=seed, epoch=epoch, start=0, stop=k)
                   + consumed(n, world=new, micro_global=micro_global, seed=seed, epoch=epoch, start=k, stop=None))
        assert spliced == full, k
    flat = np.concatenate(full)
    assert len(np.unique(flat)) == len(flat) == (n // micro_global) * micro_global


# ----------------------------------------------------------------------------------------------- resharding
def deepspeed_partitions(flat: torch.Tensor, world: int) -> list[torch.Tensor]:
    """A group's flat vector as DeepSpeed cuts it: zeros up to a multiple of 2 x world, `world` equal parts."""
    align = 2 * world
    padded = torch.cat([flat, torch.zeros((-flat.numel()) % align, dtype=flat.dtype)])
    return list(padded.chunk(world))


@pytest.mark.parametrize("length", [1, 2, 7, 40, 41])
@pytest.mark.parametrize("old,new", [(2, 1), (1, 2), (3, 4), (4, 2)])
@pytest.mark.parametrize("lean", [True, False])
def test_reshard_cuts_the_partitions_of_the_new_world_size(length, old, new, lean):
    flat = torch.randn(length, dtype=torch.float64)
    old_parts = deepspeed_partitions(flat, old)
    paddings = [max(0, min(p.numel(), (r + 1) * p.numel() - length)) for r, p in enumerate(old_parts)]
    # ZeRO saves its masters without the end padding ("lean"), BF16_Optimizer with it
    saved = [p[: p.numel() - pad] for p, pad in zip(old_parts, paddings)] if lean else old_parts
    assert unpadded_length(saved, paddings, lean=lean) == length
    want = deepspeed_partitions(flat, new)
    for rank in range(new):
        got = reshard(saved, length, want[rank].numel(), rank)
        assert torch.equal(got, want[rank]), rank
    with pytest.raises(CheckpointError):
        reshard(saved, length + 2 * old + 1, want[0].numel(), 0)


def test_shard_files_wants_one_shard_per_rank_of_the_manifest(tmp_path):
    for r in (0, 1):
        (tmp_path / f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(b"")
    (tmp_path / "mp_rank_00_model_states.pt").write_bytes(b"")
    assert [p.name[:22] for p in shard_files(tmp_path, 2)] == ["bf16_zero_pp_rank_0_mp", "bf16_zero_pp_rank_1_mp"]
    with pytest.raises(CheckpointError, match=r"ranks 0\.\.2 .* found ranks \[0, 1\]"):
        shard_files(tmp_path, 3)


# ----------------------------------------------------------------------------------------------- every engine mode
MODES = ["fp32-zero0", "fp32-zero1", "fp32-zero2", "bf16-zero0", "bf16-zero1", "bf16-zero2"]


@pytest.fixture(scope="module")
def roundtrip(tmp_path_factory):
    """tests/dist/reshard_roundtrip.py: save on 2 ranks; load that on 1 and save there; load that on 2 and resume
    the 2-rank checkpoint on 2."""
    out = tmp_path_factory.mktemp("roundtrip")
    script = str(REPO / "tests" / "dist" / "reshard_roundtrip.py")
    for nproc, phases in ((2, "save"), (1, "load,save"), (2, "load,resume")):
        proc = run_group(torchrun_cmd([script, str(out), phases], nproc=nproc), timeout=600)
        assert proc.returncode == 0, proc.stdout[-8000:]
    return out


def assert_same(want, got, where=""):
    """Bitwise equality of nested dicts/lists of tensors and scalars (NaN equals NaN: a group's unmeasured stat)."""
    if isinstance(want, dict):
        assert want.keys() == got.keys(), where
        for k in want:
            assert_same(want[k], got[k], f"{where}.{k}")
    elif isinstance(want, (list, tuple)):
        assert len(want) == len(got), where
        for i, (a, b) in enumerate(zip(want, got)):
            assert_same(a, b, f"{where}[{i}]")
    elif torch.is_tensor(want):
        assert want.dtype == got.dtype and want.shape == got.shape and torch.equal(want, got), where
    else:
        assert want == got or (want != want and got != got), (where, want, got)


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("old,new", [(2, 1), (1, 2)])
def test_a_checkpoint_loads_on_another_world_size_with_every_bit_of_its_state(roundtrip, mode, old, new):
    """fp32 masters, momentum, exp-LR bookkeeping and lr of every group, the scheduler, weights and BN buffers,
    the client state (data position): after the load on `new` ranks, what the `old` ranks saved."""
    saved = torch.load(roundtrip / mode / f"saved_w{old}.pt", weights_only=False)
    got = torch.load(roundtrip / mode / f"loaded_w{new}_from{old}.pt", weights_only=False)
    got["client"] = {k: got["client"][k] for k in saved["client"]}
    assert any(t.abs().max() > 0 for g in saved["groups"] for k, t in g["tensors"].items() if k == "momentum_buffer"), \
        "no momentum to carry: the test would prove nothing"
    assert_same(saved, got)


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_a_resume_on_the_same_world_size_continues_bitwise(roundtrip, mode):
    assert_same(torch.load(roundtrip / mode / "continued_w2.pt", weights_only=False),
                torch.load(roundtrip / mode / "resumed_w2.pt", weights_only=False))


# ----------------------------------------------------------------------------------------------- bigexp train
EPOCHS, STEPS_PER_EPOCH = 2, 8   # 512 samples, 64 per step


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """One ZeRO-1 run of the exp-LR arm, 2 micro-batches per step, stopped and resumed on another world size
    mid-epoch twice: 2 ranks to step 3 (epoch 0), 1 rank to step 11 (epoch 1), 2 ranks to the end."""
    data = fmnist_betons(tmp_path_factory.mktemp("fmnist"), train=512, val=64)
    out = tmp_path_factory.mktemp("chain")
    script = str(REPO / "tests" / "dist" / "train_recording.py")
    args = ["configs/fmnist/main.yaml", f"run.out_dir={out}", "run.name=ws", "run.progress=false",
            f"data.train_beton={data / 'train.beton'}", f"data.val_beton={data / 'val.beton'}",
            "data.write_missing=false", f"run.epochs={EPOCHS}", "data.batch_size=64", "engine.grad_accum=2",
            "data.random_crop=true", "model.width=8", "optim.optimizer=expsgd", "optim.renorm_every=3",
            "engine.zero_stage=1", "schedule.kind=cosine", "log.every_steps=4", "log.plots=false",
            "log.tensorboard=false", "data.num_workers=1"]
    logs = []
    for i, (nproc, stop) in enumerate(((2, 3), (1, 11), (2, None))):
        extra = [f"run.max_steps={stop}"] if stop else []
        proc = run_group(torchrun_cmd([script, str(out / f"leg{i}"), *args, *extra], nproc=nproc), timeout=600)
        assert proc.returncode == 0, proc.stdout[-8000:]
        logs.append(proc.stdout)
    records = [[json.loads(f.read_text()) for f in sorted((out / f"leg{i}").glob("record_rank*.json"))]
               for i in range(3)]
    return records, logs, args


@pytest.mark.slow
def test_each_epoch_takes_each_sample_once_across_world_size_changes(chain):
    records, logs, _ = chain
    assert "resumed from" in logs[1] and "at step 3 (epoch 0, batch 6)" in logs[1]
    assert "at step 11 (epoch 1, batch 6)" in logs[2]
    for epoch in range(EPOCHS):
        seen = [i for leg in records for rank in leg for e, idx in rank["batches"] if e == epoch for i in idx]
        assert sorted(seen) == list(range(512)), f"epoch {epoch}: samples skipped or repeated"


@pytest.mark.slow
def test_schedule_and_exp_lr_state_carry_over_across_world_size_changes(chain):
    from bigexp.config import load_config
    from bigexp.optim.schedules import build_schedule

    records, _, args = chain
    cfg = load_config(args[0], args[1:])
    schedule = build_schedule(cfg.schedule, STEPS_PER_EPOCH, EPOCHS * STEPS_PER_EPOCH)
    steps = [s for leg in records for s in leg[0]["steps"]]
    for leg in records:  # every rank of a leg saw the same steps
        assert all(r["steps"] == leg[0]["steps"] for r in leg)
    assert [s[0] for s in steps] == list(range(1, EPOCHS * STEPS_PER_EPOCH + 1))
    lr0 = steps[0][2]
    for step, sched_step, lrs, exp_steps in steps:
        assert sched_step == step, "the scheduler restarted"
        ratio = schedule.lr_factor(step) / schedule.lr_factor(1)
        assert lrs == pytest.approx([lr * ratio for lr in lr0], rel=1e-12), step
        assert all(e in (None, step) for e in exp_steps) and step in exp_steps, "exp-LR bookkeeping restarted"


def test_a_damaged_shard_is_named(tmp_path):
    from bigexp.run.reshard import _load_shard

    bad = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="zero_pp_rank_0_mp_rank_00_optim_states.pt: unreadable optimizer shard"):
        _load_shard(bad)
