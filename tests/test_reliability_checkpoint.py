"""Checkpoints survive kills and corruption; a NaN stops the run without touching them; a checkpoint of another
model is refused. Real `bigexp train` processes (one rank, gloo, DeepSpeed bf16), real files.

One run directory, three launches:
  1. bf16 exp-LR arm at lambda*eta = 0.084 (near the bound at momentum 0.5), checkpoints every 2 steps; a test hook
     (BIGEXP_TEST_SLEEP_IN_SAVE_AT_STEP=6) holds the step-6 save after DeepSpeed has written its files and before
     the manifest and the rename; we SIGKILL it there.
  2. The step-4 checkpoint is then truncated. `--resume auto` must warn about it by name, clear the dead save, resume
     from step 2, re-save step 4, and stop on a NaN injected at step 5 (BIGEXP_TEST_NAN_AT_STEP) with exit 3, the
     error naming step 5, checkpoints 2 and 4 intact, nothing newer.
  3. The same run directory with model.width changed: exit 2 naming the checkpoint, every file as it was.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from conftest import REPO, child_env, fmnist_betons, kill_tree, run_group, train_args

pytestmark = pytest.mark.slow


def ck_cmd(out: Path, data: Path, *extra: str) -> list[str]:
    return [sys.executable, *train_args(
        "configs/fmnist/base.yaml", out, data, "ck", "run.epochs=1", "run.threads=1", "run.checkpoint_every_steps=2",
        "run.keep_checkpoints=3", "data.batch_size=32", "data.num_workers=1", "model.width=8",
        "optim.optimizer=expsgd", "optim.lr=0.4", "optim.weight_decay=0.21", "optim.momentum=0.5",
        "optim.renorm_every=4", "engine.precision=bf16", "schedule.kind=constant", "log.every_steps=1",
        "log.plots=false", *extra)]


def snapshot(d: Path) -> dict:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() + f"@{p.stat().st_mtime_ns}"
            for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return fmnist_betons(tmp_path_factory.mktemp("ckdata"), train=512, val=64)


@pytest.fixture(scope="module")
def story(tmp_path_factory, data):
    from bigexp.run.checkpoint import verify_checkpoint

    out = tmp_path_factory.mktemp("ck")
    root = out / "ck" / "checkpoints"
    rec = {"root": root}

    # 1. killed inside the step-6 save
    log1 = open(out / "first.log", "w")
    proc = subprocess.Popen(ck_cmd(out, data), cwd=REPO, env=child_env(BIGEXP_TEST_SLEEP_IN_SAVE_AT_STEP="6"),
                            stdout=log1, stderr=subprocess.STDOUT, start_new_session=True)
    tmp6 = root / ".tmp-step000000006"
    end = time.monotonic() + 300
    while not (tmp6 / "rng_rank0.pt").is_file():  # DeepSpeed's files are written; the hook now holds the save
        assert proc.poll() is None, (out / "first.log").read_text()[-4000:]
        assert time.monotonic() < end, "the step-6 save never started"
        time.sleep(0.1)
    time.sleep(1.0)
    kill_tree(proc.pid)
    proc.wait()
    rec["after_kill"] = sorted(p.name for p in root.iterdir())
    rec["verified_after_kill"] = {p.name: verify_checkpoint(p)["global_step"] for p in root.glob("step*")}

    # 2. corrupt the newest finished checkpoint, resume, NaN at step 5
    victim = root / "step000000004" / "mp_rank_00_model_states.pt"
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size // 2)
    r = run_group(ck_cmd(out, data, "--resume", "auto"), env=child_env(BIGEXP_TEST_NAN_AT_STEP="5"),
                  timeout=300, merge_stderr=False)
    rec["nan_rc"], rec["nan_out"], rec["nan_err"] = r.returncode, r.stdout, r.stderr
    rec["after_nan"] = sorted(p.name for p in root.iterdir())
    rec["verified_after_nan"] = {p.name: verify_checkpoint(p)["global_step"] for p in root.glob("step*")}
    rec["step4"] = torch.load(root / "step000000004" / "mp_rank_00_model_states.pt", map_location="cpu",
                              weights_only=False)

    # 3. the same run directory, another model
    before = snapshot(out / "ck")
    r = run_group(ck_cmd(out, data, "model.width=4"), timeout=300, merge_stderr=False)
    rec["other_rc"], rec["other_err"] = r.returncode, r.stderr
    rec["other_unchanged"] = snapshot(out / "ck") == before
    return rec


def test_kill_during_save_leaves_previous_checkpoints_loadable(story):
    assert story["after_kill"] == [".tmp-step000000006", "step000000002", "step000000004"], story["after_kill"]
    assert story["verified_after_kill"] == {"step000000002": 2, "step000000004": 4}


def test_truncated_checkpoint_is_named_skipped_and_the_older_one_used(story):
    err = story["nan_err"]
    victim = story["root"] / "step000000004"
    assert f"skipping checkpoint {victim}" in err and "truncated" in err, err[-4000:]
    assert f"removing {story['root'] / '.tmp-step000000006'}" in err, err[-4000:]
    assert f"resumed from {story['root'] / 'step000000002'} at step 2" in story["nan_out"], story["nan_out"][-2000:]


def test_nan_loss_stops_with_exit_3_naming_the_step_and_keeps_checkpoints(story):
    assert story["nan_rc"] == 3, story["nan_err"][-4000:]
    assert "non-finite loss (nan) at step 5 " in story["nan_err"], story["nan_err"][-4000:]
    # step 4 was re-saved (valid again), nothing after the NaN, no temp dirs left over
    assert story["after_nan"] == ["step000000002", "step000000004"], story["after_nan"]
    assert story["verified_after_nan"] == {"step000000002": 2, "step000000004": 4}
    assert story["step4"]["global_step"] == 4


def test_bf16_engine_renormalises_and_keeps_invariant_norms_bounded(story):
    """DeepSpeed bf16: at lambda*eta = 0.084 the exp-LR arm's weights grow ~e^0.3 per step; ExpSGD renormalises
    inside the engine (on the fp32 masters) every 4 of its steps, so at step 4 every invariant group has been
    renormalised and sits within the band around its initial norm, and everything is finite. (The group's own step count is 5 at global step 4: DeepSpeed's bf16
    optimizer initialises its state with one zero-gradient step, which both arms take alike.)"""
    groups = [g for g in story["step4"]["exp_state"]["groups"] if g["scale_invariant"]]
    assert groups
    for g in groups:
        assert g["renorm_count"] >= 1
        assert 1 / 16 < g["weight_norm"] / g["n0"] < 16, g   # optim.renorm_band (default 16)
        assert abs(g["log_A"]) < 10 and torch.isfinite(torch.tensor(g["applied_lr"]))


def test_checkpoint_of_another_model_is_refused_and_nothing_changes(story):
    assert story["other_rc"] == 2, story["other_err"][-4000:]
    err = story["other_err"]
    assert f"{story['root'] / 'step000000004'}: written for a different model" in err, err[-3000:]
    assert "Traceback" not in err
    assert story["other_unchanged"], "the refused run modified the run directory"


def test_find_resumable_skips_every_kind_of_damage(story, tmp_path):
    """Cheap, in-process: bit-flipped (same size), manifest missing, manifest unreadable -> warned and skipped,
    newest intact one chosen."""
    from bigexp.run.checkpoint import CheckpointManager
    from bigexp.run.distributed import DistContext

    root = tmp_path / "checkpoints"
    shutil.copytree(story["root"] / "step000000002", root / "step000000002")
    for step, damage in [(3, "flip"), (4, "nomanifest"), (5, "badmanifest")]:
        d = root / f"step{step:09d}"
        shutil.copytree(story["root"] / "step000000002", d)
        if damage == "flip":
            f = d / "mp_rank_00_model_states.pt"
            b = bytearray(f.read_bytes())
            b[len(b) // 2] ^= 0xFF
            f.write_bytes(bytes(b))
        elif damage == "nomanifest":
            (d / "manifest.json").unlink()
        else:
            (d / "manifest.json").write_text("{not json")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        chosen = CheckpointManager(root, DistContext()).find_resumable("auto")
    msgs = "\n".join(str(x.message) for x in w)
    assert chosen == root / "step000000002"
    assert "step000000003" in msgs and "sha256 differs" in msgs
    assert "step000000004" in msgs and "no manifest.json" in msgs
    assert "step000000005" in msgs and "unreadable manifest" in msgs
    assert json.loads((chosen / "manifest.json").read_text())["global_step"] == 2
