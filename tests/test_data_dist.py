"""Two real ranks (torchrun, gloo): shards disjoint and complete each epoch, fresh shuffles, one writer."""
from __future__ import annotations

import json

import pytest

from conftest import IMAGENET_SAMPLE, REPO, run_group, torchrun_cmd

N = 1000


@pytest.mark.slow
@pytest.mark.skipif(not IMAGENET_SAMPLE.is_dir(), reason=f"{IMAGENET_SAMPLE} missing")
def test_two_ranks_shard_disjoint_and_complete(tmp_path):
    script = REPO / "tests" / "dist" / "data_shards.py"
    proc = run_group(torchrun_cmd([str(script), str(IMAGENET_SAMPLE), str(tmp_path)]), cwd=tmp_path, timeout=240)
    assert proc.returncode == 0, proc.stdout[-6000:]
    ranks = json.loads((tmp_path / "result.json").read_text())
    assert [r["rank"] for r in ranks] == [0, 1]

    # rank 0 wrote the file (once, though it serves as train and val set), rank 1 waited for it
    assert ranks[0]["wrote"] == ["sample.beton"] and ranks[1]["wrote"] == []
    assert not [p.name for p in tmp_path.iterdir()
                if ".tmp-" in p.name or p.name.endswith((".tmp", ".failed"))]  # bigexp.atomic's temp names

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
