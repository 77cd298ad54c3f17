"""Under torchrun: checkpoints of every precision/ZeRO mode written on one number of ranks, loaded on another.

    reshard_roundtrip.py OUT PHASE[,PHASE...]    phases, in order, on this launch's world size W:
      save      per mode: 3 steps, a checkpoint in OUT/<mode>/w<W>, its state dumped to OUT/<mode>/saved_w<W>.pt;
                3 steps more, dumped to OUT/<mode>/continued_w<W>.pt
      load      per mode, for every other world size V with a checkpoint: load it, dump OUT/<mode>/loaded_w<W>_from<V>.pt
      resume    per mode: load this world size's own checkpoint, 3 steps, dump OUT/<mode>/resumed_w<W>.pt

A dump is rank 0's view of the WHOLE optimizer state, in a form that does not depend on the world size: per param
group, the fp32 masters and each state tensor (momentum) as one flat vector (sharded partitions gathered and their end
padding cut), the param groups' scalars (lr, ExpSGD's exp_* bookkeeping), the scheduler's state, the module's
weights and buffers, the client state.
"""
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from engine_modes import build_arm
from bigexp.run.checkpoint import CheckpointManager, model_signature
from bigexp.run.distributed import exit_process, init_distributed, shutdown_distributed
from bigexp.run.step import train_micro_step

MODES = [("fp32", 0), ("fp32", 1), ("fp32", 2), ("bf16", 0), ("bf16", 1), ("bf16", 2)]
STEPS = 3


def flat_state(eng, ctx) -> dict:
    """The world-size-independent view of the optimizer state (collective)."""
    opt = eng.client_optimizer
    paddings = eng.ds.optimizer.state_dict()["group_paddings"] if eng.sharded else None
    groups = []
    for i, g in enumerate(opt.param_groups):
        tensors = {"master": [p.detach() for p in g["params"]]}
        for p in g["params"]:
            for k, v in opt.state[p].items():
                if torch.is_tensor(v) and v.dim() > 0:
                    tensors.setdefault(k, []).append(v.detach())
        out = {}
        for k, ts in tensors.items():
            flat = torch.cat([t.reshape(-1).float() for t in ts])
            if eng.sharded:
                parts = [torch.empty_like(flat) for _ in range(ctx.world_size)]
                dist.all_gather(parts, flat)
                pad = torch.tensor([paddings[i]], dtype=torch.int64)
                dist.all_reduce(pad)
                flat = torch.cat(parts)[: flat.numel() * ctx.world_size - int(pad)]
            out[k] = flat.clone()
        scalars = {k: v for k, v in g.items() if k != "params"}
        groups.append({"tensors": out, "scalars": scalars})
    module = {k: v.detach().clone() for k, v in eng.ds.module.state_dict().items()}
    return {"groups": groups, "scheduler": eng.scheduler.state_dict(), "module": module}


def steps(eng, ctx, batches):
    for x, y in batches:
        train_micro_step(eng, x, y, ctx)


def dump(obj, path: Path, ctx) -> None:
    if ctx.rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(obj, path)


def main(out: Path, phases: list[str]):
    ctx = init_distributed("cpu")
    w = ctx.world_size
    g = torch.Generator().manual_seed(200 + ctx.rank)
    # 16 px: a quarter of the 32 px cost (bf16 convolutions are slow on CPU); what is checked does not depend on it
    batches = [(torch.randn(16 // w, 3, 16, 16, generator=g), torch.randint(0, 10, (16 // w,), generator=g))
               for _ in range(2 * STEPS)]
    probe = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    for precision, zero in MODES:
        key = f"{precision}-zero{zero}"
        fresh = lambda: build_arm(ctx, precision, zero, "expsgd", 2, probe)[0]  # noqa: E731
        for phase in phases:
            if phase == "save":
                eng = fresh()
                steps(eng, ctx, batches[:STEPS])
                client = {"global_step": STEPS, "epoch": 0, "batch_in_epoch": STEPS}
                CheckpointManager(out / key / f"w{w}", ctx).save(eng, client, STEPS, model_signature(eng.ds.module))
                dump({**flat_state(eng, ctx), "client": client}, out / key / f"saved_w{w}.pt", ctx)
                steps(eng, ctx, batches[STEPS:])
                dump(flat_state(eng, ctx), out / key / f"continued_w{w}.pt", ctx)
            elif phase in ("load", "resume"):
                others = sorted(int(p.name[1:]) for p in (out / key).glob("w*") if p.is_dir())
                for v in ([w] if phase == "resume" else [v for v in others if v != w]):
                    eng = fresh()
                    mgr = CheckpointManager(out / key / f"w{v}", ctx)
                    client = mgr.load(eng, mgr.list()[0], model_signature(eng.ds.module))
                    if phase == "load":
                        dump({**flat_state(eng, ctx), "client": client}, out / key / f"loaded_w{w}_from{v}.pt", ctx)
                    else:
                        steps(eng, ctx, batches[STEPS:])
                        dump(flat_state(eng, ctx), out / key / f"resumed_w{w}.pt", ctx)
            else:
                raise SystemExit(f"unknown phase {phase!r}")
    shutdown_distributed()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2].split(","))
    exit_process(0)  # past the C++ destructors, as `bigexp train` exits
