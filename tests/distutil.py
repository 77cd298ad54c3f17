"""Launch real multi-process runs (torchrun, 2 gloo ranks) from tests."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
IMAGENET_SAMPLE = SHARED / "data" / "imagenet-sample" / "val"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dist_env(**extra) -> dict:
    # One thread per rank: two ranks share this machine's two cores.
    # Passive OpenMP waits: a spinning rank steals the other rank's core (a step went from 0.06 s to 7 s under load).
    return {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}


def torchrun_cmd(args: list[str], nproc: int = 2, extra: list[str] | None = None) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *(extra or []), *args]


def run_group(cmd, *, cwd, timeout, env=None):
    """Run in its own process group; on timeout kill the whole group (a plain kill of torchrun orphans ranks)."""
    proc = subprocess.Popen(cmd, env=env or dist_env(), cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"timed out after {timeout}s: {' '.join(map(str, cmd))}\n{out[-8000:]}")
    return proc.returncode, out
