"""One writer per run directory (bigexp/run/lock.py): a live holder refuses a second job (exit 5, holder named);
a holder that is gone (killed on this host, or silent on another) is taken over with a warning; the same SLURM job
takes its own lock back; only rank 0 holds it."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from conftest import REPO, child_env, fmnist_betons, kill_tree, run_group, train_args, torchrun_cmd

from bigexp.errors import RunLockedError
from bigexp.run.lock import RunLock, hold_run_lock, lock_path_for

HOLD = ("import sys, time; from bigexp.run.lock import RunLock; lock = RunLock(sys.argv[1]).acquire(); "
        "print('held', flush=True); time.sleep(600)")


def holder(run_dir: Path) -> subprocess.Popen:
    """Another process holding the lock of run_dir (until killed)."""
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], cwd=REPO, env=child_env(), text=True,
                         stdout=subprocess.PIPE, start_new_session=True)
    assert p.stdout.readline().strip() == "held"
    p.stdout.close()
    return p


def test_a_live_holder_refuses_a_second_one_by_name(tmp_path):
    run_dir = tmp_path / "runs" / "r"
    p = holder(run_dir)
    try:
        with pytest.raises(RunLockedError, match=rf"{run_dir} is in use by pid {p.pid} on "):
            RunLock(run_dir).acquire()
        assert not run_dir.exists(), "the lock is beside the run directory, never in it"
    finally:
        kill_tree(p.pid)


def test_a_killed_holder_is_taken_over_with_a_warning_and_release_cleans_up(tmp_path):
    run_dir = tmp_path / "runs" / "r"
    p = holder(run_dir)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert lock_path_for(run_dir).is_file()           # killed: it could not remove its file
    with pytest.warns(RuntimeWarning, match=rf"taking over the stale lock of pid {p.pid} .*no longer running"):
        lock = RunLock(run_dir).acquire()
    assert json.loads(lock_path_for(run_dir).read_text())["pid"] == os.getpid()
    lock.release()
    assert not lock_path_for(run_dir).exists() and (tmp_path / "runs").is_dir()   # made by the holder: kept


def _foreign(run_dir: Path, age_s: float, **info) -> Path:
    """A lock file left by a holder on another host, its heartbeat age_s old (no flock: another host's)."""
    path = lock_path_for(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"pid": 1, "host": "elsewhere", "slurm_job_id": "", "torchelastic_run_id": "",
                                "started": "2026-01-01T00:00:00+00:00", **info}))
    os.utime(path, (time.time() - age_s, time.time() - age_s))
    return path


def test_another_hosts_holder_counts_while_its_heartbeat_is_fresh(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    run_dir = tmp_path / "r"
    _foreign(run_dir, age_s=30, slurm_job_id="77")
    with pytest.raises(RunLockedError, match=r"pid 1 on elsewhere, SLURM job 77, .*heartbeat is 3\d s old"):
        RunLock(run_dir, stale_after_s=600).acquire()
    _foreign(run_dir, age_s=900, slurm_job_id="77")
    with pytest.warns(RuntimeWarning, match=r"stale lock of pid 1 on elsewhere.*silent for 9\d\d s"):
        RunLock(run_dir, stale_after_s=600).acquire().release()


def test_a_requeued_slurm_job_takes_its_own_lock_back(tmp_path, monkeypatch):
    run_dir = tmp_path / "r"
    _foreign(run_dir, age_s=5, slurm_job_id="4242")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    with pytest.warns(RuntimeWarning, match="this job's earlier run"):
        lock = RunLock(run_dir).acquire()
    assert json.loads(lock_path_for(run_dir).read_text())["slurm_job_id"] == "4242"
    lock.release()


def test_the_lock_is_reentrant_and_removes_what_it_made(tmp_path):
    a = RunLock(tmp_path / "new" / "r").acquire()
    b = RunLock(tmp_path / "new" / "r").acquire()      # a caller around train(), then train() itself
    assert b is a
    b.release()
    assert lock_path_for(tmp_path / "new" / "r").is_file()
    a.release()
    assert not (tmp_path / "new").exists(), "release removes the lock file and the directory it made"


def test_only_rank_0_takes_it_and_every_rank_gets_the_refusal(tmp_path):
    rank1 = types.SimpleNamespace(is_main=False, broadcast_object=lambda obj: obj)
    hold_run_lock(tmp_path / "r", rank1).release()
    assert not lock_path_for(tmp_path / "r").exists()
    told = types.SimpleNamespace(is_main=False, broadcast_object=lambda obj: "r is in use by pid 9")
    with pytest.raises(RunLockedError, match="in use by pid 9"):
        hold_run_lock(tmp_path / "r", told)


# ---------------------------------------------------------------------------------------------- real `bigexp train`
def _wait_for_holder(path: Path, proc: subprocess.Popen, log: Path, timeout: float = 300) -> dict:
    end = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, log.read_text()[-4000:]
        assert time.monotonic() < end, "the run never took its lock"
        try:
            info = json.loads(path.read_text())
            run_dir = path.parent / "r"
            if (run_dir / "config.yaml").is_file() and any(run_dir.glob("events.out.tfevents.*")):  # training
                return info
        except (OSError, ValueError):
            pass
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [1, 2])
def test_a_second_bigexp_train_on_a_live_run_exits_5_naming_the_holder(ranks, tmp_path):
    """A slow run (BIGEXP_TEST_STEP_DELAY_S) holds the run; a second `bigexp train` there exits 5 naming its pid
    (under torchrun: rank 0's); once the first is SIGKILLed, a third takes the stale lock over and finishes."""
    data = fmnist_betons(tmp_path / "data", train=128, val=32)
    out = tmp_path / "runs"
    args = train_args("configs/fmnist/base.yaml", out, data, "r", "run.threads=1", "data.batch_size=32",
                      "data.num_workers=1", "model.width=8", "log.plots=false", "run.max_steps=2")
    cmd = [sys.executable, *args] if ranks == 1 else torchrun_cmd(args, nproc=2)
    log = tmp_path / "first.log"
    with open(log, "w") as fh:
        first = subprocess.Popen(cmd, cwd=REPO, env=child_env(BIGEXP_TEST_STEP_DELAY_S="600"), stdout=fh,
                                 stderr=subprocess.STDOUT, start_new_session=True)
    try:
        info = _wait_for_holder(lock_path_for(out / "r"), first, log)
        if ranks == 2:   # the holder is rank 0 of the two torchrun started, not the agent
            assert info["pid"] != first.pid
            env = Path(f"/proc/{info['pid']}/environ").read_bytes().split(b"\0")
            assert b"RANK=0" in env and b"WORLD_SIZE=2" in env
        before = sorted(p.name for p in (out / "r").rglob("*"))
        second = run_group([sys.executable, *args], timeout=300, merge_stderr=False)
        assert second.returncode == 5, (second.returncode, second.stderr[-3000:])
        assert f"{out / 'r'} is in use by pid {info['pid']} on " in second.stderr, second.stderr[-3000:]
        assert "Traceback" not in second.stderr
        assert sorted(p.name for p in (out / "r").rglob("*")) == before
    finally:
        kill_tree(first.pid)
    third = run_group([sys.executable, *args], timeout=400, merge_stderr=False)
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"taking over the stale lock of pid {info['pid']}" in third.stderr, third.stderr[-3000:]
    assert not lock_path_for(out / "r").exists()
