"""Under torchrun (2 gloo ranks): every precision/ZeRO mode, both arms, a few steps through a real DeepSpeed engine.

Writes <out>/engine_modes.json (rank 0) with, per mode: the baseline-vs-exp output gap, the renorm-vs-no-renorm
output gap, how many renormalisations happened, and whether the ranks hold identical weights.
"""
import json
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

STEPS = 6
INIT_SCALE = 0.1
# gamma = 0.5, lr x wd = 0.08 (under the existence bound (1 - sqrt(0.5))^2 = 0.0858): alpha = 0.774, so the exp-LR
# arm's LR grows ~1.7x per step; invariant weights start at 0.1x their init (the same function, 100x the effective
# LR; at 0.5x the norm grew 2% in 6 steps, and a power-of-two renormalisation of a 2% growth is c = 1), so their norm grows fast and every renormalisation divides by a c far from 1, which is what we test.
MODES = [("fp32", 0), ("fp32", 1), ("fp32", 2), ("bf16", 0), ("bf16", 1), ("bf16", 2)]


def build_arm(ctx, precision, zero, optimizer, renorm_every, probe):
    """A DeepSpeed engine of one arm (tests/dist/reshard_roundtrip.py builds the same ones): the engine, the built
    optimizer."""
    cfg = load_config("configs/fmnist/base.yaml", [
        f"engine.precision={precision}", f"engine.zero_stage={zero}", f"optim.optimizer={optimizer}",
        f"optim.renorm_every={renorm_every}", "optim.lr=0.4", "optim.weight_decay=0.2", "optim.momentum=0.5",
        "data.batch_size=16", "model.width=8", "model.bn_eps=1e-30", "model.channels_last=false", "schedule.kind=step",
        "schedule.milestones=[1]", "run.epochs=2"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    built = build_optimizer(cfg, model, probe[:4].clone())
    with torch.no_grad():  # small invariant weights: same function, large effective LR, fast norm growth
        for g in built.optimizer.param_groups:
            if g.get("scale_invariant"):
                for p in g["params"]:
                    p.mul_(INIT_SCALE)
    schedule = build_schedule(cfg.schedule, steps_per_epoch=STEPS // 2, total_steps=STEPS)
    eng = build_engine(cfg, model, built.optimizer, lambda o: ParamGroupScheduler(o, schedule), ctx)
    return eng, built


def run_arm(ctx, precision, zero, optimizer, renorm_every, batches, probe):
    eng, built = build_arm(ctx, precision, zero, optimizer, renorm_every, probe)
    for x, y in batches:
        train_micro_step(eng, x, y, ctx)  # the training loop's own step
    # Train-mode forward (batch statistics): the function the theorem is about, no running stats involved.
    with torch.no_grad():
        out = eng.ds(probe.to(eng.dtype)).float()
    flat = torch.cat([p.detach().float().reshape(-1) for p in eng.ds.module.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(ctx.world_size)]
    dist.all_gather(gathered, flat)
    same = all(torch.equal(gathered[0], g) for g in gathered[1:])
    stats = getattr(built.optimizer, "group_stats", lambda: [])()
    renorms = sum(int(s.get("renorm_count", 0)) for s in stats)
    norms = [float(s["weight_norm"]) for s in stats if s.get("scale_invariant")]
    return out, same, renorms, eng, norms


def main(out_dir):
    ctx = init_distributed("cpu")
    g = torch.Generator().manual_seed(100 + ctx.rank)  # each rank its own data, as in data parallelism
    batches = [(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g))
               for _ in range(STEPS)]
    probe = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    results = {}
    fp32_base = None
    for precision, zero in MODES:
        key = f"{precision}-zero{zero}"
        base, same_b, _, eng_b, _ = run_arm(ctx, precision, zero, "sgd", 10**9, batches, probe)
        exp, same_e, n_renorm, eng_e, norms_r = run_arm(ctx, precision, zero, "expsgd", 2, batches, probe)
        nore, _, n0, eng_n, norms_n = run_arm(ctx, precision, zero, "expsgd", 10**9, batches, probe)
        scale = float(base.abs().max())
        fp32_base = fp32_base if precision == "bf16" else base
        results[key] = {
            # bf16's own noise floor: how far rounding alone moves the baseline from its fp32 twin.
            "gap_sgd_vs_fp32_sgd": float((base - fp32_base).abs().max()) / scale,
            "sharded": eng_e.sharded,
            "gap_exp_vs_sgd": float((exp - base).abs().max()) / scale,
            "gap_renorm_vs_none": float((exp - nore).abs().max()) / scale,
            "renorms": n_renorm, "renorms_without": n0,
            "invariant_norm_with_renorm": norms_r, "invariant_norm_without": norms_n,
            "ranks_identical": bool(same_b and same_e),
        }
    if ctx.rank == 0:
        with open(os.path.join(out_dir, "engine_modes.json"), "w") as f:
            json.dump(results, f, indent=1)
    shutdown_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
    exit_process(0)  # past the C++ destructors, as `bigexp train` exits
