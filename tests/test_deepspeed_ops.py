"""bigexp.run.deepspeed_ops: no DeepSpeed op that training never calls is compiled at start-up.

The comm backend's `deepspeed_shm_comm` (CPU accelerator) cost 30 s to 3 min of g++ on each fresh machine, and on
every start where two `ninja` versions alternate (seen here: the CI suite rebuilt it a dozen times). These fail if a
DeepSpeed upgrade renames the op or its "not compatible" path, or if the engine stops calling skip_unused_ops.
"""
from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from conftest import REPO, child_env, fmnist_betons, train_args


def test_marked_op_is_not_built_by_the_comm_backend():
    ds_torch = importlib.import_module("deepspeed.comm.torch")   # `import a.b.torch as x` binds torch itself
    from bigexp.run.deepspeed_ops import UNUSED_OPS, skip_unused_ops

    skip_unused_ops()
    import deepspeed.ops
    assert all(deepspeed.ops.__compatible_ops__.get(n) is False for n in UNUSED_OPS)
    assert ds_torch.build_shm_op() is None      # DeepSpeed's own "no such op here" path: nothing compiled


@pytest.mark.slow
def test_a_training_run_compiles_no_op(tmp_path):
    data = fmnist_betons(tmp_path / "data", train=64, val=32)
    ext = tmp_path / "torch_extensions"          # empty: any op built lands here
    cmd = [sys.executable, *train_args(str(REPO / "configs/fmnist/base.yaml"), tmp_path / "runs", data, "ops",
                                       "run.epochs=1", "model.width=4", "data.batch_size=32", "data.num_workers=1",
                                       "run.threads=1", "log.tensorboard=false", "log.plots=false")]
    env = dict(child_env(), TORCH_EXTENSIONS_DIR=str(ext))
    out = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    built = sorted(p.name for p in ext.iterdir()) if ext.exists() else []
    assert built == [], f"ops compiled at start-up: {built}"
