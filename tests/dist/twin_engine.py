"""Under torchrun (2 gloo ranks): optim.twin = exact through a real DeepSpeed engine (fp32 ZeRO 0/1/2, bf16 ZeRO 1,
bf16_autocast), BN eps 1e-5, against the torch-SGD baseline in the same mode; native mode beside it.

Writes <out>/twin_engine.json (rank 0): per mode, the train- and eval-mode output gaps of exact and native vs the
baseline, the eps an absorbing BN ended with, and 1/A**2 of the invariant group (what that eps must be over eps0).
"""
import json
import math
import os
import sys

import torch
import torch.distributed as dist

from bigexp.config import load_config
from bigexp.models import build_model
from bigexp.optim.build import build_optimizer
from bigexp.optim.schedules import ParamGroupScheduler, build_schedule
from bigexp.run.distributed import exit_process, init_distributed, shutdown_distributed
from bigexp.run.engine import build_engine
from bigexp.run.step import train_micro_step

STEPS = 8
# gamma 0.5, lr x wd = 0.08 (as tests/dist/engine_modes.py): A_t falls ~1.3x per step, so eps 1e-5 moves ~100x
# relative to the variance over 8 steps in native mode, which the exact twin compensates.
MODES = [("fp32", 0), ("fp32", 1), ("fp32", 2), ("bf16", 1), ("bf16_autocast", 0)]


def run_arm(ctx, precision, zero, optimizer, twin, batches, probe):
    cfg = load_config("configs/fmnist/base.yaml", [
        f"engine.precision={precision}", f"engine.zero_stage={zero}", f"optim.optimizer={optimizer}",
        f"optim.twin={twin}", "optim.renorm_every=3", "optim.lr=0.4", "optim.weight_decay=0.2", "optim.momentum=0.5",
        "data.batch_size=16", "model.width=8", "model.bn_eps=1e-5", "model.channels_last=false",
        "schedule.kind=cosine", "run.epochs=1"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    built = build_optimizer(cfg, model, probe[:4].clone())
    eng = build_engine(cfg, model, built.optimizer,
                       lambda o: ParamGroupScheduler(o, build_schedule(cfg.schedule, STEPS, STEPS)), ctx)
    for x, y in batches:
        train_micro_step(eng, x, y, ctx)
    m = eng.ds.module
    dtype = next(m.parameters()).dtype
    bufs = [b.detach().clone() for b in m.buffers()]
    with torch.no_grad():
        train = eng.ds(probe.to(dtype)).double()
        for b, s in zip(m.buffers(), bufs):
            b.copy_(s)
        eng.ds.eval()
        ev = eng.ds(probe.to(dtype)).double()
        eng.ds.train()
    out = {"train": train, "eval": ev}
    if built.twin is not None:
        g = next(g for g in built.optimizer.param_groups if g["scale_invariant"])
        log_a = g["exp_log_A"] + g["exp_log_A_lo"] + g["exp_log2_A"] * math.log(2.0)
        st = built.twin.state()[0]
        out.update(eps=st["eps"], eps_want=1e-5 * math.exp(-2 * log_a * st["degrees"][g["exp_index"]]),
                   renorms=sum(s["renorm_count"] for s in built.optimizer.group_stats()))
    return out


def main(out_dir):
    ctx = init_distributed("cpu")
    g = torch.Generator().manual_seed(100 + ctx.rank)
    batches = [(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g))
               for _ in range(STEPS)]
    probe = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    results = {}
    for precision, zero in MODES:
        base = run_arm(ctx, precision, zero, "sgd", "native", batches, probe)
        exact = run_arm(ctx, precision, zero, "expsgd", "exact", batches, probe)
        native = run_arm(ctx, precision, zero, "expsgd", "native", batches, probe)
        rel = lambda a, k: float((a[k] - base[k]).abs().max() / base[k].abs().max())  # noqa: E731
        results[f"{precision}-zero{zero}"] = {
            "exact_train": rel(exact, "train"), "exact_eval": rel(exact, "eval"),
            "native_train": rel(native, "train"), "native_eval": rel(native, "eval"),
            "eps": exact["eps"], "eps_want": exact["eps_want"], "renorms": exact["renorms"]}
        dist.barrier()
    if ctx.rank == 0:
        with open(os.path.join(out_dir, "twin_engine.json"), "w") as f:
            json.dump(results, f, indent=1)
    shutdown_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
    exit_process(0)  # past the C++ destructors, as `bigexp train` exits
