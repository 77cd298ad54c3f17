"""A week-long run must survive its cluster: preemption signals, killed ranks, killed jobs, all under real torchrun.

One chain of 2-rank runs of the same config (fp32, ZeRO 1, the exp-LR arm with renormalisations, seeded random
crop + flip, checkpoints every 3 steps, so most of them land mid-epoch), each interrupted differently, must end with
BITWISE the state of an uninterrupted run:

  reference   uninterrupted
  attempt 1   --max-restarts 1; SIGKILL to rank 1 at a random step after a checkpoint -> torchrun restarts the
              group, which resumes from the newest checkpoint (`run.resume: auto`); then SIGUSR1 to both ranks
              (what SLURM's --signal sends to job steps) -> checkpoint at the step boundary, exit 0
  attempt 2   --resume auto; SIGTERM to the torchrun agent (what the sbatch trap sends through srun) -> the agent
              forwards it to the ranks and waits; they checkpoint and exit
  attempt 3   --resume auto; the whole job SIGKILLed at a random step of epoch 1 (a node dies)
  attempt 4   --resume auto; runs to the end

A test-only hook (BIGEXP_TEST_STEP_DELAY_S) slows steps to ~0.25 s so signals land mid-run, not after it.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, child_env, children, fmnist_betons, kill_tree, torchrun_cmd, train_args

pytestmark = pytest.mark.slow

SEED = int(os.environ.get("BIGEXP_REL_SEED", random.randrange(10**6)))
EPOCHS = 2            # 512 samples / 32 per step = 16 steps per epoch, 32 in all
STEP_DELAY_S = 0.25
TIMEOUT_S = 240


def rel_args(out: Path, data: Path, *extra: str, deterministic: bool = True) -> list[str]:
    """This file's run. deterministic=False for the files that reuse it to test launchers (tests/test_multinode.py,
    tests/test_slurm.py): torch.use_deterministic_algorithms fills every torch.empty with NaN, and DeepSpeed's ZeRO
    takes a 5e8-element (2 GB) gradient bucket with torch.empty every micro-step, ~0.25 s a rank-step on this CPU
    (a 32-step rank: 53 s, 15 s without). On CPU the trajectory is bitwise the same either way (the schema says so;
    measured on this config); this file keeps run.deterministic=true, so resuming in that mode stays covered."""
    return train_args("configs/fmnist/base.yaml", out, data, "rel", f"run.epochs={EPOCHS}", "run.threads=1",
                      f"run.deterministic={str(deterministic).lower()}", "run.checkpoint_every_steps=3",
                      "run.keep_checkpoints=2",
                      "data.batch_size=32", "data.num_workers=1", "data.random_crop=true", "model.width=8",
                      "optim.optimizer=expsgd", "optim.lr=0.2", "optim.momentum=0.9", "optim.weight_decay=5e-4",
                      "optim.renorm_every=4", "engine.zero_stage=1", "engine.precision=fp32", "schedule.kind=step",
                      "schedule.milestones=[1]", "log.every_steps=4", "log.plots=false", *extra)


class Job:
    """One torchrun launch in its own session; output to a file we can poll."""

    def __init__(self, args, log: Path, restarts: int = 0, delay: float = STEP_DELAY_S):
        self.log_path = log
        # c10d rendezvous, as launch/torchrun_single.sh (--standalone) and the sbatch use (see torchrun_cmd)
        cmd = torchrun_cmd(args, elastic=True, extra=["--max-restarts", str(restarts)])
        env = child_env(BIGEXP_TEST_STEP_DELAY_S=str(delay), BIGEXP_DIST_TIMEOUT_MIN="2")
        self.f = open(log, "w")
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self.f,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.t0 = time.monotonic()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def ranks(self) -> dict[int, int]:
        """{local rank: pid} of the agent's live worker processes."""
        out = {}
        for pid in children(self.proc.pid):
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            for kv in env:
                if kv.startswith(b"LOCAL_RANK="):
                    out[int(kv.split(b"=")[1])] = pid
        return out

    def wait_until(self, what: str, pred, timeout: float = TIMEOUT_S):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            v = pred()
            if v:
                return v
            if self.proc.poll() is not None:
                pytest.fail(f"run ended (rc {self.proc.returncode}) while waiting for {what}\n{self.log()[-6000:]}")
            time.sleep(0.1)
        self.kill()
        pytest.fail(f"timed out waiting for {what}\n{self.log()[-6000:]}")

    def wait(self, timeout: float = TIMEOUT_S) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"run did not finish in {timeout}s\n{self.log()[-6000:]}")

    def kill(self):
        """SIGKILL the agent AND its ranks (each in a session of its own), and wait until they are gone."""
        kill_tree(self.proc.pid)
        self.proc.wait()


def steps_saved(run_dir: Path) -> list[int]:
    root = run_dir / "checkpoints"
    return sorted(int(p.name[4:]) for p in root.glob("step*")) if root.is_dir() else []


def newest_after(run_dir: Path, step: int):
    s = steps_saved(run_dir)
    return s[-1] if s and s[-1] > step else None


def resumed_at(log: str, nth: int = 1):
    """Step of the nth '[bigexp] resumed from ... at step N' line (1-based), or None."""
    lines = [ln for ln in log.splitlines() if "[bigexp] resumed from" in ln]
    return int(lines[nth - 1].split(" at step ")[1].split()[0]) if len(lines) >= nth else None


def state_of(ckpt: Path) -> dict:
    """Everything that defines the continuation: weights, BN buffers of every rank, the ZeRO shards (fp32 masters,
    momentum), scheduler, exp-LR bookkeeping (renorm counts included), data position."""
    def load(name):
        return torch.load(ckpt / name, map_location="cpu", weights_only=False)
    model = load("mp_rank_00_model_states.pt")
    out = {k: model[k] for k in ("module", "lr_scheduler", "global_steps", "global_step", "epoch",
                                 "batch_in_epoch", "exp_state")}
    for r in (0, 1):
        out[f"zero{r}"] = load(f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt")["optimizer_state_dict"]
        out[f"buffers{r}"] = load(f"rng_rank{r}.pt")["module_buffers"]
    return out


def diff(a, b, path="") -> list[str]:
    """Bitwise differences between two nested checkpoint structures."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        ok = (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
              and a.shape == b.shape and torch.equal(a, b))
        return [] if ok else [path]
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{path} keys {sorted(set(a) ^ set(b), key=str)}"]
        return [d for k in a for d in diff(a[k], b[k], f"{path}/{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in diff(x, y, f"{path}[{i}]")]
    if type(a) is type(b) and hasattr(a, "__dict__") and type(a).__eq__ is object.__eq__:
        return diff(vars(a), vars(b), path)  # e.g. DeepSpeed's loss scaler: compare its fields, not identity
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return fmnist_betons(tmp_path_factory.mktemp("reldata"), train=512, val=128)


@pytest.fixture(scope="module")
def chain(tmp_path_factory, data):
    from bigexp.run.checkpoint import verify_checkpoint

    rng = random.Random(SEED)
    print(f"BIGEXP_REL_SEED={SEED}")
    tmp = tmp_path_factory.mktemp("chain")
    rec = {"seed": SEED}

    ref = Job(rel_args(tmp / "ref", data), tmp / "ref.log", delay=0)
    assert ref.wait() == 0, ref.log()[-6000:]
    rec["ref"] = state_of(tmp / "ref" / "rel" / "checkpoints" / f"step{16 * EPOCHS:09d}")

    run_dir = tmp / "int" / "rel"
    rec["run_dir"] = run_dir
    args = rel_args(tmp / "int", data)

    # attempt 1: a rank dies, torchrun restarts the group, which resumes; then SIGUSR1 to the ranks
    job = Job(args, tmp / "a1.log", restarts=1)
    first = job.wait_until("a first checkpoint", lambda: newest_after(run_dir, 0))
    time.sleep(rng.uniform(0, 3) * STEP_DELAY_S)
    pids = job.ranks()
    os.kill(pids[1], signal.SIGKILL)
    rec["killed_rank_after"] = first
    resumed = job.wait_until("the restarted group to resume", lambda: resumed_at(job.log()))
    rec["restart_resumed_at"] = resumed
    job.wait_until("a checkpoint after the restart", lambda: newest_after(run_dir, resumed))
    time.sleep(rng.uniform(0, 3) * STEP_DELAY_S)
    new_pids = job.ranks()
    assert new_pids and pids[0] != new_pids.get(0), "torchrun did not start a new worker group"
    for pid in new_pids.values():
        os.kill(pid, signal.SIGUSR1)
    rec["a1_rc"] = job.wait()
    rec["a1_log"] = job.log()
    rec["a1_saved"] = steps_saved(run_dir)

    # attempt 2: SIGTERM to the torchrun agent, as srun delivers the sbatch trap's signal
    job = Job(args + ["--resume", "auto"], tmp / "a2.log")
    resumed = job.wait_until("attempt 2 to resume", lambda: resumed_at(job.log()))
    rec["a2_resumed_at"] = resumed
    job.wait_until("a checkpoint in attempt 2", lambda: newest_after(run_dir, resumed))
    time.sleep(rng.uniform(0, 3) * STEP_DELAY_S)
    job.proc.send_signal(signal.SIGTERM)
    rec["a2_rc"] = job.wait()
    rec["a2_log"] = job.log()
    rec["a2_saved"] = steps_saved(run_dir)
    rec["a2_verified"] = verify_checkpoint(run_dir / "checkpoints" / f"step{rec['a2_saved'][-1]:09d}")["global_step"]

    # attempt 3: the whole job SIGKILLed at a random step after a new checkpoint (a node dies)
    job = Job(args + ["--resume", "auto"], tmp / "a3.log")
    resumed = job.wait_until("attempt 3 to resume", lambda: resumed_at(job.log()))
    rec["a3_resumed_at"] = resumed
    # in epoch 1, so the last resume lands mid-epoch in an epoch with other data order and augmentation keys
    job.wait_until("a checkpoint of epoch 1 in attempt 3", lambda: newest_after(run_dir, max(resumed, 16)))
    time.sleep(rng.uniform(0, 3) * STEP_DELAY_S)
    job.kill()
    rec["a3_saved"] = steps_saved(run_dir)

    # attempt 4: to the end
    job = Job(args + ["--resume", "auto"], tmp / "a4.log", delay=0)
    rec["a4_rc"] = job.wait()
    rec["a4_log"] = job.log()
    rec["final"] = state_of(run_dir / "checkpoints" / f"step{16 * EPOCHS:09d}")
    return rec


def test_killed_rank_is_restarted_by_torchrun_and_resumes(chain):
    log = chain["a1_log"]
    # the restarted group resumed from a checkpoint at or after the one that existed before the kill
    assert chain["restart_resumed_at"] >= chain["killed_rank_after"], log[-4000:]
    assert log.count("[bigexp] resumed from") == 1, log[-4000:]


def test_sigusr1_to_the_ranks_checkpoints_and_exits_0(chain):
    log = chain["a1_log"]
    assert chain["a1_rc"] == 0, log[-4000:]
    line = next(ln for ln in log.splitlines() if "[bigexp] preempted: checkpoint at step" in ln)
    step = int(line.split("at step ")[1].split(";")[0])
    assert step == chain["a1_saved"][-1] and step < 16 * EPOCHS
    assert step % 3 != 0 or step > chain["restart_resumed_at"]  # a checkpoint of its own, at the signalled step


def test_sigterm_to_torchrun_is_forwarded_and_ranks_checkpoint(chain):
    log = chain["a2_log"]
    assert "[bigexp] preempted: checkpoint at step" in log, log[-4000:]
    step = int(log.split("[bigexp] preempted: checkpoint at step ")[1].split(";")[0])
    assert step == chain["a2_saved"][-1] > chain["a2_resumed_at"]
    # The agent forwarded SIGTERM and the ranks left on their own within its grace period (no SIGKILL); the agent
    # then re-raises the signal (torchrun's SignalException, rc 1), which the sbatch trap ignores: it requeues.
    assert "closing signal SIGTERM" in log and "SIGKILL" not in log, log[-4000:]
    assert chain["a2_verified"] == step


def test_resume_after_every_interruption_is_bitwise_the_uninterrupted_run(chain):
    assert chain["a4_rc"] == 0, chain["a4_log"][-4000:]
    assert chain["a3_saved"][-1] > chain["a3_resumed_at"]
    assert resumed_at(chain["a4_log"]) == chain["a3_saved"][-1]
    ref, fin = chain["ref"], chain["final"]
    assert fin["global_step"] == ref["global_step"] == 16 * EPOCHS
    renorms = [g["renorm_count"] for g in fin["exp_state"]["groups"] if g["scale_invariant"]]
    assert renorms and min(renorms) > 0, "the chain must cross renormalisations"
    assert diff(ref, fin) == [], f"seed {chain['seed']}: {diff(ref, fin)[:20]}"
