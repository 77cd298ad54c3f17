"""ExpSGD.step vs torch.optim.SGD on ResNet-50's parameter set, as bigexp builds both arms: foreach and fused.

Both optimizers come from `bigexp.optim.build.build_optimizer` (the same invariant + plain param groups; the
arms differ in the optimizer class only) on two identical torchvision ResNet-50s whose .grad are fixed random
tensors. Each measurement is a block of `--steps` optimizer steps (default: renorm_every, so every block holds
exactly one renormalisation: the cost is amortised at ExpSGD's default period) per arm, the four arms' steps
(ExpSGD and SGD, each with the foreach and with the fused kernel) interleaved one by one (A B C D, D C B A, ...),
reported as mean seconds per step. ratio = median over blocks of (ExpSGD block time / SGD block time) with the
foreach kernels (top-level keys); the same for the fused kernels under "fused".

    python bench/optimizer.py [--rounds 3] [--steps 100] [--arch resnet50] [--devices auto]

Prints ONE JSON object on stdout; progress goes to stderr.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

C.take_stdout()

import torch  # noqa: E402

import _arms as A  # noqa: E402

TARGET_RATIO = 1.0  # ExpSGD step time / SGD step time (same kernel kind)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet50", help="bigexp model whose parameters are stepped")
    p.add_argument("--rounds", type=int, default=3, help="measured blocks (after warm-up)")
    p.add_argument("--steps", type=int, default=None,
                   help="optimizer steps per measured block (default: optim.renorm_every = 100)")
    p.add_argument("--warmup-steps", type=int, default=5)
    p.add_argument("--devices", default="auto", help="auto (cpu, plus cuda when present) | cpu | cuda | cpu,cuda")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--profile", action="store_true", help="also time ExpSGD's parts (stderr + JSON 'profile')")
    return p.parse_args(argv)


def build_arms(arch: str, device: torch.device):
    from bigexp.models import build_model, example_input
    from bigexp.optim.build import build_optimizer

    # contiguous weights, as the engine hands DeepSpeed; batch 256 is the schema's default (res: a data key, unused)
    cfg = A.make_config(arch, res=224, batch=256, precision="fp32", channels_last=False)
    torch.manual_seed(0)
    base = build_model(cfg.model)
    x = example_input(cfg.model)
    arms = {}
    for kernel in ("foreach", "fused"):
        for arm in ("expsgd", "sgd"):
            model = copy.deepcopy(base).to(device)
            cfg.optim.optimizer = arm
            built = build_optimizer(cfg, model, x.to(device), fused=kernel == "fused")
            g = torch.Generator().manual_seed(1)
            for p in model.parameters():
                if p.requires_grad:
                    p.grad = (torch.randn(p.shape, generator=g) * 1e-3).to(device)
            arms[arm if kernel == "foreach" else f"{arm}_fused"] = (model, built)
    return cfg, arms


def interleaved_block(opts: dict, steps: int, device, first: int) -> dict:
    """`steps` steps of every optimizer, interleaved step by step (A B, B A, ... starting with arm number
    `first`), each step timed alone. Returns {arm: [seconds of each step]}. Interleaving single steps puts both
    arms under the same machine load at the same moment, which a shared machine otherwise never gives."""
    names = list(opts)
    names = names[first:] + names[:first]
    times = {n: [] for n in names}
    for i in range(steps):
        for n in (names if i % 2 == 0 else names[::-1]):
            A.sync(device)
            t = C.timer()
            opts[n].step()
            A.sync(device)
            times[n].append(t())
    return times


@torch.no_grad()
def profile_expsgd(opt, steps: int, device) -> dict:
    """Cost of the group norms (one pass over the weights), which step() now pays only on renormalisation steps."""
    groups = list(opt.param_groups)
    A.sync(device)
    t = C.timer()
    for _ in range(steps):
        opt._group_norms(groups)
    A.sync(device)
    return {"group_norms_s_per_step": t() / steps}


def _pair(per_block: dict, all_steps: dict, exp: str, sgd: str) -> dict:
    """One kernel kind's figures: mean s/step per block, the median of the per-block ratios, single steps."""
    ratios = [a / b for a, b in zip(per_block[exp], per_block[sgd])]
    es, ss = C.summary(all_steps[exp]), C.summary(all_steps[sgd])
    out = {"expsgd_s_per_step": C.summary(per_block[exp]), "sgd_s_per_step": C.summary(per_block[sgd]),
           # median over blocks of (ExpSGD block time / SGD block time), the arms measured interleaved
           "ratio": C.summary(ratios)["median"], "ratio_per_block": ratios,
           # single steps: the median ignores the renormalisation steps
           "expsgd_step_s": es, "sgd_step_s": ss, "ratio_of_step_medians": es["median"] / ss["median"],
           "target_ratio_max": TARGET_RATIO}
    out["meets_target"] = out["ratio"] <= TARGET_RATIO
    return out


def bench_device(args, device: torch.device) -> dict:
    cfg, arms = build_arms(args.arch, device)
    steps = args.steps or cfg.optim.renorm_every
    opts = {name: built.optimizer for name, (_, built) in arms.items()}
    exp_opt = opts["expsgd"]
    n_params = sum(p.numel() for p in arms["sgd"][0].parameters() if p.requires_grad)
    groups = [{"name": g.get("name"), "params": len(g["params"]), "numel": sum(p.numel() for p in g["params"]),
               "scale_invariant": bool(g.get("scale_invariant", False))} for g in exp_opt.param_groups]
    for _ in range(args.warmup_steps):
        for o in opts.values():
            o.step()
    C.log(f"{device}: {n_params} params, {args.rounds} blocks of {steps} interleaved steps per arm ({list(opts)})")
    per_block = {n: [] for n in opts}
    all_steps = {n: [] for n in opts}
    for r in range(args.rounds):
        times = interleaved_block(opts, steps, device, first=r % len(opts))
        for n, ts in times.items():
            per_block[n].append(sum(ts) / len(ts))  # mean over the block: its renormalisation amortised
            all_steps[n].extend(ts)
        C.log(f"block {r + 1}/{args.rounds}: " + ", ".join(f"{n} {per_block[n][-1]:.4g} s/step" for n in opts))
    out = {"device": str(device), "params": n_params, "groups": groups, "steps_per_block": steps,
           "renorm_count": sum(g["exp_renorm_count"] for g in exp_opt.param_groups),
           **_pair(per_block, all_steps, "expsgd", "sgd"),
           "fused": _pair(per_block, all_steps, "expsgd_fused", "sgd_fused")}
    if args.profile:
        out["profile"] = profile_expsgd(exp_opt, min(steps, 20), device)
        C.log(f"profile: {out['profile']}")
    return out


def main(argv=None) -> int:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = {"auto": ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])}.get(
        args.devices, [d.strip() for d in args.devices.split(",") if d.strip()])
    report = C.base_report("optimizer", args)
    report["results"] = {}
    for d in devices:
        if d == "cuda" and not torch.cuda.is_available():
            report["notes"].append("cuda requested but not available: skipped")
            continue
        report["results"][d] = bench_device(args, torch.device(d))
    report["ratio"] = {d: r["ratio"] for d, r in report["results"].items()}
    report["ratio_fused"] = {d: r["fused"]["ratio"] for d, r in report["results"].items()}
    report["target"] = f"ExpSGD / SGD step time <= {TARGET_RATIO}"
    C.emit(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
