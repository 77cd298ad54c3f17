"""What bench/ and tests/ share about this checkout and its child processes: where the repo and the shared data
are, the environment a child python gets, a torchrun command line, and running a command in a session of its own
that a timeout ends whole, torchrun's ranks included. tests/conftest.py imports this module (bench/ on sys.path);
it loads nothing heavy, so the tests that read the source (tests/test_structure.py) never import torch.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
IMAGENET_SAMPLE = SHARED / "data" / "imagenet-sample" / "val"   # 1,000 real JPEGs, one per class
FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")          # Debian's dataset-fashion-mnist
TAIL = 8000  # characters of a command's output that a failure message keeps


def child_env(threads: int = 1, **extra: str) -> dict:
    """os.environ for a child python: bigexp importable from this checkout, `threads` OpenMP threads per process
    (two ranks share a 2-core machine), passive OpenMP waits unless the environment says otherwise (a spinning
    rank steals the other rank's core: a step went from 0.06 s to 7 s under load), then `extra`."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": str(threads), **extra}


def torchrun_cmd(args: list[str], nproc: int = 2, *, elastic: bool = False, extra: list[str] = ()) -> list[str]:
    """`python -m torch.distributed.run` on this machine, on a free port. elastic: c10d rendezvous, which
    `--max-restarts` needs (in `extra`): each restart round gets a fresh store, where with a static master address
    the agent's store outlives a restart and the new group's gloo mesh reads the dead group's addresses
    ("connectFullMesh failed ... Connection refused")."""
    # imported here: bigexp.run.distributed loads torch, which the callers of the rest of this module never need
    from bigexp.run.distributed import free_port

    port = free_port()
    where = (["--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "bigexp"] if elastic
             else ["--master_addr", "127.0.0.1", "--master_port", str(port)])
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), *where, *extra, *args]


def children(pid: int) -> list[int]:
    """The live children of `pid` (of any of its threads), from /proc."""
    out = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            out += [int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
        except OSError:
            pass
    return out


def _alive(pid: int) -> bool:
    try:
        return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


def kill_tree(pid: int, wait_s: float = 30.0) -> None:
    """SIGKILL `pid`, everything below it and their process groups, and wait until they are gone. torchrun starts
    each rank in a session of its own, so killing the agent's group alone leaves the ranks running (writing
    checkpoints, holding the output pipe open). The tree is read before anything is killed: a dead agent's
    children are re-parented and no longer found under it."""
    pids, todo = [], [pid]
    while todo:
        pids.append(todo.pop())
        todo += children(pids[-1])
    groups = set()
    for p in pids:
        try:
            groups.add(os.getpgid(p))
        except ProcessLookupError:
            pass
    groups.discard(os.getpgrp())  # never our own group
    for kill, ids in ((os.killpg, groups), (os.kill, pids)):
        for i in ids:
            try:
                kill(i, signal.SIGKILL)
            except ProcessLookupError:
                pass
    end = time.monotonic() + wait_s
    while any(_alive(p) for p in pids):  # zombies count as gone: their parent (maybe us) reaps them
        if time.monotonic() > end:
            raise RuntimeError(f"processes {[p for p in pids if _alive(p)]} survived SIGKILL for {wait_s} s")
        time.sleep(0.05)


class GroupTimeout(subprocess.TimeoutExpired):
    """run_group's timeout; the message ends with the tail of what the command wrote."""

    def __str__(self) -> str:
        text = (self.output or "") + (self.stderr or "")
        return f"timed out after {self.timeout} s: {' '.join(map(str, self.cmd))}\n{text[-TAIL:]}"


def run_group(cmd: list, *, timeout: float, cwd: Path = REPO, env: dict | None = None,
              merge_stderr: bool = True) -> subprocess.CompletedProcess:
    """Run `cmd` to its end in a session of its own (env: child_env() unless given), output captured as text,
    stderr folded into stdout unless `merge_stderr` is false. On timeout the whole tree is killed and
    GroupTimeout raised."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env or child_env(), text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, err = proc.communicate()
        raise GroupTimeout(cmd, timeout, out, err) from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
