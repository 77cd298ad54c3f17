"""ExpSGD.step vs torch.optim.SGD(foreach=True) on ResNet-50's parameter set, as bigexp builds both arms.

Both optimizers come from `bigexp.optim.build.build_optimizer` (the same invariant + plain param groups; the
arms differ in the optimizer class only) on two identical torchvision ResNet-50s whose .grad are fixed random
tensors. Each measurement is a block of `--steps` optimizer steps (default: renorm_every, so every block holds
exactly one renormalisation: the cost is amortised at ExpSGD's default period) per arm, the two arms'
steps interleaved one by one (A B, B A, ...), reported as mean seconds per step. ratio = median over blocks
of (ExpSGD block time / SGD block time).

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

TARGET_RATIO = 1.05  # ExpSGD step time / SGD step time


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
    for arm in ("expsgd", "sgd"):
        model = copy.deepcopy(base).to(device)
        cfg.optim.optimizer = arm
        built = build_optimizer(cfg, model, x.to(device))
        g = torch.Generator().manual_seed(1)
        for p in model.parameters():
            if p.requires_grad:
                p.grad = (torch.randn(p.shape, generator=g) * 1e-3).to(device)
        arms[arm] = (model, built)
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
    """Per-step cost of ExpSGD's one extra pass over the weights (the group norms every step needs)."""
    groups = list(opt.param_groups)
    A.sync(device)
    t = C.timer()
    for _ in range(steps):
        opt._group_norms(groups)
    A.sync(device)
    return {"group_norms_s_per_step": t() / steps}


def bench_device(args, device: torch.device) -> dict:
    cfg, arms = build_arms(args.arch, device)
    steps = args.steps or cfg.optim.renorm_every
    exp_opt, sgd_opt = arms["expsgd"][1].optimizer, arms["sgd"][1].optimizer
    n_params = sum(p.numel() for p in arms["sgd"][0].parameters() if p.requires_grad)
    groups = [{"name": g.get("name"), "params": len(g["params"]), "numel": sum(p.numel() for p in g["params"]),
               "scale_invariant": bool(g.get("scale_invariant", False))} for g in exp_opt.param_groups]
    for _ in range(args.warmup_steps):
        exp_opt.step()
        sgd_opt.step()
    C.log(f"{device}: {n_params} params, {args.rounds} blocks of {steps} interleaved steps per arm")
    per_block = {"expsgd": [], "sgd": []}
    all_steps = {"expsgd": [], "sgd": []}
    ratios = []
    for r in range(args.rounds):
        times = interleaved_block({"expsgd": exp_opt, "sgd": sgd_opt}, steps, device, first=r % 2)
        for n, ts in times.items():
            per_block[n].append(sum(ts) / len(ts))  # mean over the block: its renormalisation amortised
            all_steps[n].extend(ts)
        ratios.append(per_block["expsgd"][-1] / per_block["sgd"][-1])
        C.log(f"block {r + 1}/{args.rounds}: expsgd {per_block['expsgd'][-1]:.4g} s/step, "
              f"sgd {per_block['sgd'][-1]:.4g} s/step, ratio {ratios[-1]:.3f}")
    e, s = C.summary(per_block["expsgd"]), C.summary(per_block["sgd"])
    es, ss = C.summary(all_steps["expsgd"]), C.summary(all_steps["sgd"])
    out = {"device": str(device), "params": n_params, "groups": groups, "steps_per_block": steps,
           "renorm_count": sum(g["exp_renorm_count"] for g in exp_opt.param_groups),
           # mean seconds per step of each block (renormalisation amortised); median/min/max over blocks
           "expsgd_s_per_step": e, "sgd_s_per_step": s,
           # median over blocks of (ExpSGD block time / SGD block time), the two measured interleaved
           "ratio": C.summary(ratios)["median"], "ratio_per_block": ratios,
           # single steps: the median ignores the renormalisation steps
           "expsgd_step_s": es, "sgd_step_s": ss, "ratio_of_step_medians": es["median"] / ss["median"],
           "target_ratio_max": TARGET_RATIO}
    out["meets_target"] = out["ratio"] <= TARGET_RATIO
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
    report["target"] = f"ExpSGD / SGD step time <= {TARGET_RATIO}"
    C.emit(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
