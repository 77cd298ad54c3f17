"""One torchrun launch of bench/scaling.py: every rank runs bigexp's train step (DeepSpeed engine + ExpSGD,
bigexp.run.step.train_micro_step) on a fixed per-rank batch; rank 0 writes the timing as JSON to argv[1].

    torchrun --nproc_per_node N bench/_scaling_worker.py OUT.json ARCH RES BATCH_PER_RANK WARMUP STEPS THREADS
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402  (sets the OpenMP wait policy before torch loads)

import torch  # noqa: E402

import _arms as A  # noqa: E402


def main() -> int:
    out, arch, res, batch, warmup, steps, threads = sys.argv[1:8]
    res, batch, warmup, steps, threads = int(res), int(batch), int(warmup), int(steps), int(threads)
    torch.set_num_threads(threads)
    from bigexp.run.distributed import exit_process, init_distributed, shutdown_distributed

    ctx = init_distributed("cpu")
    cfg = A.make_config(arch, res, batch, "fp32", world_size=ctx.world_size, device="cpu")
    arm, _ = A.build_pair(cfg, ctx, res=res, batch=batch, with_plain=False)
    torch.set_num_threads(threads)
    for _ in range(warmup):
        arm.step()
    times = []
    for _ in range(steps):
        ctx.barrier()  # every rank times the same interval
        t0 = time.perf_counter()
        arm.step()
        times.append(time.perf_counter() - t0)
    ctx.barrier()
    if ctx.is_main:
        med = C.summary(times)["median"]
        rec = {"world_size": ctx.world_size, "threads_per_rank": threads, "batch_per_rank": batch,
               "step_s": C.summary(times), "images_per_s": batch * ctx.world_size / med,
               "images_per_s_mean": batch * ctx.world_size * len(times) / sum(times),
               "sharded": arm.engine.sharded}
        tmp = out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(rec, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    shutdown_distributed()
    exit_process(0)  # past DeepSpeed/gloo destructors, as bigexp train does
    return 0


if __name__ == "__main__":
    sys.exit(main())
