"""Two real ranks (torchrun, gloo): shards disjoint and complete each epoch, fresh shuffles, one writer."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO.parent / "shared" / "data" / "imagenet-sample" / "val"
N = 1000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_group(cmd, *, env, cwd, timeout):
    """Run in its own process group; on timeout kill the whole group (torchrun's ranks included,
    which a plain kill of torchrun would orphan)."""
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"torchrun timed out after {timeout}s:\n{out[-6000:]}")
    return proc.returncode, out


@pytest.mark.slow
@pytest.mark.skipif(not SAMPLE.is_dir(), reason=f"{SAMPLE} missing")
def test_two_ranks_shard_disjoint_and_complete(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           str(REPO / "tests" / "dist" / "data_shards.py"), str(SAMPLE), str(tmp_path)]
    rc, out = run_group(cmd, env=env, cwd=tmp_path, timeout=240)
    assert rc == 0, out[-6000:]
    ranks = json.loads((tmp_path / "result.json").read_text())
    assert [r["rank"] for r in ranks] == [0, 1]

    # rank 0 wrote the file (once, though it serves as train and val set), rank 1 waited for it
    assert ranks[0]["wrote"] == ["sample.beton"] and ranks[1]["wrote"] == []
    assert not [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name or p.name.endswith(".failed")]

    # 1000 samples, 2 ranks x 50 per batch: 10 batches per rank, nothing dropped
    assert ranks[0]["len"] == ranks[1]["len"] == 10
    orders = []
    for epoch in ("0", "1", "2"):
        a, b = ranks[0]["epochs"][epoch], ranks[1]["epochs"][epoch]
        assert len(a) == len(b) == 500
        assert not set(a) & set(b), f"epoch {epoch}: shards overlap"
        assert sorted(a + b) == list(range(N)), f"epoch {epoch}: not every sample exactly once"
        orders.append((a, b))
    assert orders[0] != orders[1] != orders[2] and orders[0] != orders[2]  # new shuffle each epoch
    assert set(orders[0][0]) != set(orders[1][0])  # ... and a new split between ranks

    # validation: round-robin shards, every sample once, no padding
    va, vb = ranks[0]["val"], ranks[1]["val"]
    assert va == list(range(0, N, 2)) and vb == list(range(1, N, 2))
    assert all(r["threads"] == 1 for r in ranks)
