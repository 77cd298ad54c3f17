"""SLURM for real: a one-node cluster on this machine (slurm/local_cluster.sh: slurm-wlm + munge, installed by the
fixture), the project's own sbatch scripts on a tiny Fashion-MNIST run (tests/test_reliability_dist.py's config:
2 ranks, ZeRO 1, exp-LR with renormalisations, random crops, checkpoints every 3 steps; 32 steps; run.deterministic
off, see rel_args).

One job, `sbatch --ntasks=2` (srun starts both ranks; the .beton files staged to LOCAL_DATA, with cp where rsync is
absent), is interrupted the three ways clusters do it, in this order:
  (c) time limit: once it has a checkpoint, its TimeLimit is cut to inside the script's --signal=B:USR1@120 lead
      (`scontrol update`), so SLURM's own time-limit check sends USR1 to the batch shell -> the trap signals the job
      steps, the ranks checkpoint and exit 0, `scontrol requeue`; the limit is then put back
  (b) `scancel --signal=USR1 --batch` (what an admin or a preemption script sends): the same path
  (a) `scontrol requeue` from outside: SLURM SIGTERMs every process itself (the ranks checkpoint) and requeues
      (SIGKILL only after KillWait: slurm/local_cluster.sh sets 180 s, a loaded machine's ranks took over 30 s)
and must end BITWISE equal to the same run uninterrupted: `sbatch --ntasks=1` with NPROC_PER_NODE=2 (torchrun
starts the ranks). Beside them, sharing the node (-s): `slurm/compare_array.sh` with compare.seeds (one array task
per arm and seed, the report as an afterok job) and three jobs the script must refuse, each with a clear message.
A test-only hook (BIGEXP_TEST_STEP_DELAY_S) slows the interrupted job's steps so each signal lands mid-run.
"""
from __future__ import annotations

import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, child_env, fmnist_betons
from test_compare import small_overrides
from test_reliability_dist import diff, rel_args as _rel_args, resumed_at, state_of, steps_saved
from test_seeds_control import _scalars_of

# The fixture drives every job and ends with them; under a loaded machine it outlasts pytest's 900 s default.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

CLUSTER = REPO / "slurm" / "local_cluster.sh"
BODY = "slurm/bigexp.sbatch"
STEPS = 32            # rel_args: 2 epochs of 512 images at batch 32
DELAY_S = 2.0         # per step of the interrupted job: SLURM's time-limit check runs every 30 s (at most ~15 steps
                      # between the time-limit cut and its USR1, so (b) and (a) still find steps to interrupt)
TIMEOUT_S = 1400      # all of the fixture; ~4 min on an idle 2-core machine
SEEDS = (0, 1)        # compare_array.sh: 2 arms x 2 seeds, one array task each
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
        "PREEMPTED"}


def rel_args(out: Path, data: Path, *extra: str) -> list[str]:
    """tests/test_reliability_dist.py's run without run.deterministic (see there: bitwise the same on CPU, and
    several times faster under ZeRO); that file keeps covering resume in deterministic mode."""
    return _rel_args(out, data, *extra, deterministic=False)


def _sh(*cmd, timeout=60, check=True, env=None) -> str:
    r = subprocess.run([str(c) for c in cmd], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    if check and r.returncode:
        raise AssertionError(f"{' '.join(map(str, cmd))}: rc {r.returncode}\n{r.stdout}{r.stderr}")
    return r.stdout


@pytest.fixture(scope="session")
def cluster():
    """The local cluster, up; stopped afterwards unless it was already running."""
    if os.geteuid() != 0:
        pytest.skip("a local SLURM cluster needs root (apt-get install slurm-wlm munge, daemons)")
    if not shutil.which("sbatch") and not shutil.which("apt-get"):
        pytest.skip("slurm is not installed and there is no apt-get to install it")
    was_up = subprocess.run(["bash", CLUSTER, "status"], capture_output=True).returncode == 0
    r = subprocess.run(["bash", CLUSTER, "install"], capture_output=True, text=True, timeout=600)
    if r.returncode:
        pytest.skip(f"slurm-wlm could not be installed here:\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
    r = subprocess.run(["bash", CLUSTER, "start"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    yield
    if not was_up:
        subprocess.run(["bash", CLUSTER, "stop"], capture_output=True, timeout=60)


def job_env(**extra) -> dict:
    """What a job inherits (sbatch exports the submitting environment): bigexp from this checkout through PYTHON.
    PATH is left alone: torch's extension builds call whichever `ninja` is first on it, and two ninja versions
    rebuild DeepSpeed's CPU op in turn (their build logs differ)."""
    env = child_env(**{"PYTHON": sys.executable, "BIGEXP_DIST_TIMEOUT_MIN": "2", "BIGEXP_TEST_STEP_DELAY_S": "0",
                       **extra})
    return {k: v for k, v in env.items() if not k.startswith("SLURM_")}  # pytest itself may run inside a job


def sbatch(*args, env: dict) -> int:
    r = subprocess.run(["sbatch", "--parsable", *map(str, args)], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    return int(r.stdout.strip().split(";")[0])


def infos(jid: int) -> list[dict]:
    """scontrol show job, one {field: value} per job (an array: one per task); values without spaces are all
    this file reads."""
    out = _sh("scontrol", "show", "job", "-o", jid, check=False)
    return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in out.splitlines() if line.strip()]


def info(jid: int) -> dict:
    return (infos(jid) or [{}])[0]


def ended(jid: int) -> bool:
    """Every task of the job in a final state. No answer is not an end: `scontrol show job` timing out on a busy
    slurmctld printed nothing, which once let the fixture scancel a job in the middle of its last run."""
    got = infos(jid)
    return bool(got) and all(d.get("JobState") in DONE for d in got)


def runs_of(jid: int) -> list[str]:
    """The job-completion log (`sacct --completion`): one line per run of the job; a requeued run is PENDING."""
    return _sh("sacct", "--completion", "-j", jid, "-n", "-P", "-o", "state").split()


def seconds(t: str) -> int:
    """SLURM's [D-]HH:MM:SS / MM:SS as seconds."""
    days, _, hms = t.rpartition("-")
    parts = [int(p) for p in hms.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0)
    return int(days or 0) * 86400 + parts[0] * 3600 + parts[1] * 60 + parts[2]


def read(p: Path) -> str:
    return p.read_text(errors="replace") if p.exists() else ""


class Waiter:
    """Polls with one deadline for the whole fixture; a failure shows the log being waited on. Every 2 s it also
    keeps `scontrol show job` of each submitted job that has ended (slurmctld forgets it after MinJobAge)."""

    def __init__(self, timeout: float):
        self.end = time.monotonic() + timeout
        self.ids: list[int] = []
        self.ended: dict[int, list[dict]] = {}
        self.last = 0.0

    def track(self):
        for i in self.ids:
            if i not in self.ended and ended(i):
                self.ended[i] = infos(i)
        self.last = time.monotonic()

    def until(self, what: str, pred, log: Path, poll: float = 0.2):
        while time.monotonic() < self.end:
            if time.monotonic() - self.last > 2:
                self.track()
            v = pred()
            if v:
                return v
            time.sleep(poll)
        pytest.fail(f"timed out waiting for {what}\n{read(log)[-6000:]}")


@pytest.fixture(scope="module")
def jobs(cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("slurm")
    (tmp / "data").mkdir()
    data = fmnist_betons(tmp / "data", train=512, val=128)
    rec: dict = {"tmp": tmp}
    w = Waiter(TIMEOUT_S)
    ids = w.ids
    t0 = time.monotonic()
    try:
        # the interrupted job first: it is the one whose timing matters
        log = rec["log"] = tmp / "int.out"
        run_dir = rec["run_dir"] = tmp / "int" / "rel"
        jid = rec["id"] = sbatch("-s", "--ntasks=2", "-o", log, BODY, *rel_args(tmp / "int", data)[4:],
                                 env=job_env(LOCAL_DATA=str(tmp / "local"), BIGEXP_TEST_STEP_DELAY_S=str(DELAY_S)))
        ids.append(jid)
        rec["ref_id"] = sbatch("-s", "--ntasks=1", "-o", tmp / "ref.out", BODY, *rel_args(tmp / "ref", data)[4:],
                               env=job_env(NPROC_PER_NODE="2"))
        ids.append(rec["ref_id"])
        out = _sh("bash", "slurm/compare_array.sh", "-s", "--ntasks=1", f"--output={tmp}/arm-%a.out",
                  "configs/fmnist/base.yaml", *small_overrides(data, tmp / "cmp"), "log.plots=false",
                  f"compare.seeds=[{','.join(map(str, SEEDS))}]", timeout=120, env=job_env())
        rec["array_out"] = out
        rec["arms_id"], rec["report_id"] = (int(x) for x in re.findall(r"job (\d+)", out))
        ids += [rec["arms_id"], rec["report_id"]]
        # refused: a time limit inside the signal lead; torchrun with 2 tasks; a requeue without progress
        small = [*rel_args(tmp / "guard", data)[4:], "run.epochs=1"]
        for name, opts, env in (("short", ["--time=2"], {}), ("tasks", ["--ntasks=2"], {"LAUNCHER": "torchrun"}),
                                ("idle", ["--ntasks=1"], {"MAX_IDLE_REQUEUES": "0"})):
            rec[f"{name}_id"] = sbatch("-s", *opts, "-o", tmp / f"{name}.out", BODY, *small, env=job_env(**env))
            ids.append(rec[f"{name}_id"])
        # `idle`: USR1 as soon as its rank is launched, long before a first step
        w.until("the idle job's launch", lambda: "[sbatch" in read(tmp / "idle.out") and " srun: " in
                read(tmp / "idle.out"), tmp / "idle.out")
        _sh("scancel", "--signal=USR1", "--batch", rec["idle_id"])

        # (c) time limit: cut it to inside the 120 s lead once there is a checkpoint; SLURM signals at its next check
        first = w.until("a first checkpoint", lambda: steps_saved(run_dir), log)[-1]
        limit = info(jid)["TimeLimit"]
        cut = math.ceil((seconds(info(jid)["RunTime"]) + 60) / 60)   # 60-120 s left: inside the lead
        _sh("scontrol", "update", f"JobId={jid}", f"TimeLimit={cut}")
        t_cut = time.monotonic()
        w.until("SLURM's time-limit USR1", lambda: "] USR1:" in read(log), log)
        rec["c"] = {"after": first, "signal_s": time.monotonic() - t_cut, "cut_min": cut}
        _sh("scontrol", "update", f"JobId={jid}", f"TimeLimit={limit}")

        # (b) USR1 to the batch shell, once the requeued job has resumed and saved a new checkpoint
        r1 = w.until("the first resume", lambda: resumed_at(read(log), 1), log)
        w.until("a checkpoint after the first resume", lambda: steps_saved(run_dir)[-1] > r1, log)
        _sh("scancel", "--signal=USR1", "--batch", jid)

        # (a) scontrol requeue, likewise
        r2 = w.until("the second resume", lambda: resumed_at(read(log), 2), log)
        w.until("a checkpoint after the second resume", lambda: steps_saved(run_dir)[-1] > r2, log)
        _sh("scontrol", "requeue", jid)

        w.until("every job to end", lambda: w.track() or len(w.ended) == len(ids), log, poll=1)
        rec["wall_s"] = time.monotonic() - t0
        rec["info"] = {i: w.ended[i][0] for i in ids}
        rec["arms"] = w.ended[rec["arms_id"]]
        print({k: v for k, v in rec.items() if k in ("c", "wall_s")})
        return rec
    finally:
        left = [str(i) for i in ids if not ended(i)]
        if left:
            subprocess.run(["scancel", *left], capture_output=True, timeout=60)


def test_interrupted_job_was_requeued_three_times_and_resumed_from_its_preemption_checkpoints(jobs):
    log = read(jobs["log"])
    job = jobs["info"][jobs["id"]]
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", log[-6000:]
    assert job["Restarts"] == "3", log[-6000:]
    assert runs_of(jobs["id"]) == ["PENDING"] * 3 + ["COMPLETED"]   # sacct: three requeued runs, then the last
    # Every interruption reached the ranks: each wrote a checkpoint of its own at the signalled step, and the next
    # start resumed from exactly that one.
    saved = [int(s) for s in re.findall(r"\[bigexp\] preempted: checkpoint at step (\d+)", log)]
    resumed = [resumed_at(log, n) for n in (1, 2, 3)]
    assert len(saved) == 3 and saved == resumed, log[-6000:]
    assert saved[0] >= jobs["c"]["after"] and saved == sorted(saved) and saved[-1] < STEPS
    assert log.count("] USR1:") == 2 and log.count("] SIGTERM:") == 1   # (c), (b) through the trap; (a) SLURM's
    assert log.count("scontrol requeue") == 2
    # srun started both ranks (2 tasks); the data was staged with cp (no rsync here) and read from there
    assert "srun: 2 ranks" in log
    assert ("(cp -p -u)" if not shutil.which("rsync") else "(rsync -a)") in log
    assert f"data: {jobs['tmp'] / 'local' / 'train.beton'} {jobs['tmp'] / 'local' / 'val.beton'}" in log


def test_time_limit_signal_came_from_slurm_within_its_check_interval(jobs):
    c = jobs["c"]
    # SLURM checks time limits every 30 s; the cut left 60-120 s, inside the 120 s lead
    assert c["signal_s"] < 45, c


def test_end_state_is_bitwise_the_uninterrupted_job(jobs):
    ref_log = read(jobs["tmp"] / "ref.out")
    assert jobs["info"][jobs["ref_id"]]["JobState"] == "COMPLETED", ref_log[-6000:]
    assert "torchrun: 1 node(s) x 2 rank(s)" in ref_log and "[bigexp] resumed from" not in ref_log
    ref = state_of(jobs["tmp"] / "ref" / "rel" / "checkpoints" / f"step{STEPS:09d}")
    fin = state_of(jobs["run_dir"] / "checkpoints" / f"step{STEPS:09d}")
    assert fin["global_step"] == ref["global_step"] == STEPS
    assert diff(ref, fin) == [], diff(ref, fin)[:20]


def test_refused_jobs_fail_at_once_with_the_reason(jobs):
    tmp, inf = jobs["tmp"], jobs["info"]
    for name, msg in (("short", "is not longer than the --signal lead"),
                      ("tasks", "LAUNCHER=torchrun needs one task per node"),
                      ("idle", "not requeueing")):
        log = read(tmp / f"{name}.out")
        assert inf[jobs[f"{name}_id"]]["JobState"] == "FAILED", (name, log[-3000:])
        assert msg in log and inf[jobs[f"{name}_id"]]["Restarts"] == "0", (name, log[-3000:])
    assert "[bigexp] preempted" not in read(tmp / "idle.out")


def test_compare_array_runs_one_task_per_arm_and_seed_then_the_report(jobs):
    tmp, inf = jobs["tmp"], jobs["info"]
    logdir = tmp / "cmp" / "cmp"
    arms = jobs["arms"]
    assert sorted(a.get("ArrayTaskId") for a in arms) == ["0", "1", "2", "3"], jobs["array_out"]
    for a in arms:
        assert a["JobState"] == "COMPLETED", read(tmp / f"arm-{a['ArrayTaskId']}.out")[-3000:]
    # task -> (arm, seed), arm-major: each task trained its own run directory with its own seed
    for task, (arm, seed) in enumerate((a, s) for a in ("sgd", "expsgd") for s in SEEDS):
        assert f"{task}={arm}/seed{seed}" in jobs["array_out"], jobs["array_out"]
        run = logdir / arm / f"seed{seed}"
        assert f"--arm {arm} --seed {seed}" in read(tmp / f"arm-{task}.out"), read(tmp / f"arm-{task}.out")[-3000:]
        assert (run / "config.yaml").is_file() and steps_saved(run), run
        assert yaml.safe_load((run / "config.yaml").read_text())["run"]["seed"] == seed
    report = inf[jobs["report_id"]]
    assert report["JobState"] == "COMPLETED", read(next(logdir.glob("slurm-report-*.out"), tmp / "none"))
    assert report["Dependency"] == "(null)" and (logdir / "report.md").is_file()
    # the report started only after every task had ended
    assert info_time(report["StartTime"]) >= max(info_time(a["EndTime"]) for a in arms)
    # its seed table holds the numbers in the tasks' event files (read with TensorBoard, statistics here)
    text = (logdir / "report.md").read_text()
    top1 = {(a, s): _scalars_of(logdir / a / f"seed{s}")["val/top1"] for a in ("sgd", "expsgd") for s in SEEDS}
    fin = {k: v[max(v)] for k, v in top1.items()}
    for arm in ("sgd", "expsgd"):
        f = [fin[arm, s] for s in SEEDS]
        assert f"| {arm} | 0, 1 | {statistics.mean(f):.2f} ± {statistics.stdev(f):.2f} |" in text, text
    diffs = [fin["expsgd", s] - fin["sgd", s] for s in SEEDS]
    assert f"| expsgd − sgd | final top-1 % | {diffs[0]:+.2f}, {diffs[1]:+.2f} |" in text, text


def info_time(t: str) -> float:
    return time.mktime(time.strptime(t, "%Y-%m-%dT%H:%M:%S"))
