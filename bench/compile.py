"""engine.compile: the bigexp train step (DeepSpeed + the arm's optimizer, `bigexp.run.step.train_micro_step`) with
the model compiled (torch.compile, inductor by default) vs eager, both arms (sgd, expsgd), in one process.

Per case and arm: compile time (the first compiled step's wall time minus an eager step's: dynamo tracing plus
inductor's code generation for forward and backward) and the steady-state step time of each, after warm-up,
measured as alternating rounds (eager, compiled, compiled, eager, ...); ratio = median over rounds of (compiled
s/step / eager s/step) of each round's back-to-back pair. Below 1: compiling pays.

    python bench/compile.py [--cases fmnist_resnet:32:128:4,resnet18:64:32:2] [--arms sgd,expsgd]
                            [--rounds 3] [--precision fp32] [--device auto] [--backend inductor]

A case is ARCH:RES:BATCH[:STEPS] (STEPS: steps per measurement). fmnist_resnet at 32 px, batch 128, is the README
main job's step (configs/fmnist/main.yaml). Prints ONE JSON object on stdout (load average at start and end too:
compile and step times on a shared machine are noisy).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

C.take_stdout()

import torch  # noqa: E402

import _arms as A  # noqa: E402
from train import parse_cases  # noqa: E402  (the ARCH:RES:BATCH[:STEPS] syntax, one home)

DEFAULT_CASES = "fmnist_resnet:32:128:4,resnet18:64:32:2"


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=DEFAULT_CASES, help="comma-separated ARCH:RES:BATCH[:STEPS]")
    p.add_argument("--arms", default="sgd,expsgd")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "bf16_autocast"])
    p.add_argument("--rounds", type=int, default=3, help="measured rounds after warm-up")
    p.add_argument("--warmup", type=int, default=1, help="warm-up measurements per variant (after compiling)")
    p.add_argument("--steps", type=int, default=None, help="steps per measurement (overrides the cases')")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--backend", default=None, help="torch.compile backend (default: bigexp's, inductor)")
    return p.parse_args(argv)


def load() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def timed_step(arm: A.Arm, device) -> float:
    A.sync(device)
    t = C.timer()
    arm.step()
    A.sync(device)
    return t()


def seconds_per_step(arm: A.Arm, steps: int, device):
    """A measurement: `steps` steps of `arm`, returning seconds per step."""
    def run() -> float:
        A.sync(device)
        t = C.timer()
        for _ in range(steps):
            arm.step()
        A.sync(device)
        return t() / steps
    return run


def bench_arm(args, ctx, arch: str, res: int, batch: int, steps: int, optimizer: str) -> dict:
    """Eager and compiled engines of one arm from the same init: compile time, steady step times, ratio."""
    # each arm compiles afresh, as a `bigexp train` process would (in one `bigexp compare` process the second
    # arm finds the first's graphs in dynamo's cache: same code, guards pass)
    torch._dynamo.reset()
    variants = {}
    first = {}
    for compiled in (False, True):
        cfg = A.make_config(arch, res, batch, args.precision, optimizer=optimizer, channels_last=ctx.device.type
                            == "cuda", device=args.device)
        cfg.engine.compile = compiled
        arm, _ = A.build_pair(cfg, ctx, res=res, batch=batch, with_plain=False)
        name = "compiled" if compiled else "eager"
        first[name] = timed_step(arm, ctx.device)  # compiled: tracing + code generation happen here
        first[name + "_second"] = timed_step(arm, ctx.device)
        variants[name] = arm
    per_step = {n: seconds_per_step(a, steps, ctx.device) for n, a in variants.items()}
    s_per_step = C.alternate(per_step, rounds=args.rounds, warmup=args.warmup)
    ratios = [c / e for c, e in zip(s_per_step["compiled"], s_per_step["eager"])]
    eager, comp = C.summary(s_per_step["eager"]), C.summary(s_per_step["compiled"])
    return {"eager_s_per_step": eager, "compiled_s_per_step": comp,
            "ratio_compiled_over_eager": C.summary(ratios)["median"], "ratio_per_round": ratios,
            "compile_s": first["compiled"] - eager["median"], "first_step_s": first,
            "images_per_s": {"eager": batch / eager["median"], "compiled": batch / comp["median"]}}


def main(argv=None) -> int:
    args = parse(argv)
    if args.backend:
        from bigexp.run.engine import COMPILE_BACKEND_ENV
        os.environ[COMPILE_BACKEND_ENV] = args.backend
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    from bigexp.run.distributed import init_distributed, shutdown_distributed
    from bigexp.run.engine import compile_backend

    ctx = init_distributed(args.device)
    report = C.base_report("compile", args)
    report["backend"] = compile_backend()
    report["load_avg_start"] = load()
    report["notes"].append("bigexp's own step (DeepSpeed engine, train_micro_step) on a fixed random batch; "
                           "compiled = engine.compile: true (DeepSpeed engine.compile, in place); the optimizer "
                           "is never compiled")
    report["results"] = {}
    threads = torch.get_num_threads()
    for arch, res, batch, steps in parse_cases(args.cases, args.steps):
        for optimizer in [a.strip() for a in args.arms.split(",") if a.strip()]:
            key = f"{arch}@{res}px/b{batch}/{args.precision}/{optimizer}"
            C.log(f"{key}: building eager and compiled engines")
            torch.set_num_threads(threads)
            r = bench_arm(args, ctx, arch, res, batch, steps, optimizer)
            r.update(arch=arch, res=res, batch=batch, optimizer=optimizer, steps_per_measurement=steps,
                     load_avg=load())
            report["results"][key] = r
            C.log(f"{key}: compiled/eager {r['ratio_compiled_over_eager']:.3f}, compile {r['compile_s']:.1f} s")
    report["ratio"] = {k: r["ratio_compiled_over_eager"] for k, r in report["results"].items()}
    report["compile_s"] = {k: r["compile_s"] for k, r in report["results"].items()}
    report["load_avg_end"] = load()
    C.emit(report)
    shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
