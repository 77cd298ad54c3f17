"""The main job's two speed-ups on a CPU, measured side by side: channels-last, and both arms at once.

One training step (forward, backward, SGD with momentum and weight decay) of the main job's network
(configs/fmnist/main.yaml: fmnist_resnet, width 16, 28 px, batch 128, random data) in these layouts:

  seq_nchw   one arm at a time, all cores as torch threads, NCHW            (the main job before)
  seq_cl     one arm at a time, all cores as torch threads, channels-last
  par_nchw   both arms at once, each a process with cores / 2 threads, NCHW
  par_cl     both arms at once, each a process with cores / 2 threads, channels-last  (compare.parallel)

Each layout is a fresh child process (or two at once) timing `--steps` steps after `--warmup` steps; layouts are
alternated over `--rounds` rounds (A B C D, D C B A, ...). `arm_step_s` is the wall time per step of ONE arm's
worth of work: a sequential layout's step time, a parallel layout's step time / 2 (two arms advance together).
`ratio_vs_seq_nchw` = arm_step_s / seq_nchw's (median over rounds): what the main job's training time scales by.

    python bench/parallel_arms.py [--rounds 3] [--steps 30] [--batch 128] [--res 28]

Prints ONE JSON object on stdout; progress goes to stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from bigexp.run import allocator  # noqa: E402

LAYOUTS = {"seq_nchw": (1, False), "seq_cl": (1, True), "par_nchw": (2, False), "par_cl": (2, True)}
TCMALLOC_LAYOUT = "par_cl_tcmalloc"  # par_cl with gperftools' tcmalloc preloaded (compare.parallel's children)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=30, help="timed steps per child")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--res", type=int, default=28)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--worker", nargs=2, metavar=("THREADS", "CHANNELS_LAST"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def worker(args) -> None:
    """One arm's steps in this process: prints {"step_s": median seconds per step} on its stdout."""
    import torch
    import torch.nn.functional as F

    from bigexp.config.schema import ModelConfig
    from bigexp.models import build_model

    threads, channels_last = int(args.worker[0]), args.worker[1] == "1"
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = build_model(ModelConfig(arch="fmnist_resnet", num_classes=10, width=args.width)).to(memory_format=fmt)
    x = torch.randn(args.batch, 3, args.res, args.res).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (args.batch,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    print(json.dumps({"step_s": sorted(times)[len(times) // 2]}), flush=True)


def run_layout(args, name: str, preload: str | None = None) -> float:
    """Seconds per step of one arm's work in layout `name` (a parallel layout's step / its process count)."""
    procs, channels_last = LAYOUTS[name]
    threads = max(1, (os.cpu_count() or 1) // procs)
    argv = [sys.executable, __file__, "--worker", str(threads), "1" if channels_last else "0",
            "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch),
            "--res", str(args.res), "--width", str(args.width)]
    env = allocator.with_preload(dict(os.environ, OMP_NUM_THREADS=str(threads)), preload)
    children = [subprocess.Popen(argv, stdout=subprocess.PIPE, env=env, text=True) for _ in range(procs)]
    steps = []
    for ch in children:
        out, _ = ch.communicate()
        if ch.returncode:
            raise SystemExit(f"parallel_arms: worker of {name} exited {ch.returncode}")
        steps.append(json.loads(out.strip().splitlines()[-1])["step_s"])
    return max(steps) / procs  # the slower of two concurrent arms sets when both are done


def main(argv=None) -> None:
    args = parse(argv)
    if args.worker:
        worker(args)
        return
    C.take_stdout()
    report = C.base_report("parallel_arms", args)
    layouts = {name: (lambda n=name: run_layout(args, n)) for name in LAYOUTS}
    tcmalloc = allocator.tcmalloc_path()
    if tcmalloc:
        layouts[TCMALLOC_LAYOUT] = lambda: run_layout(args, "par_cl", preload=tcmalloc)
    else:
        report["notes"].append("tcmalloc not found (apt install libtcmalloc-minimal4): par_cl_tcmalloc not measured")
    runs = C.alternate(layouts, rounds=args.rounds, warmup=0)
    med = {name: C.summary(v)["median"] for name, v in runs.items()}
    report["layouts"] = {name: {"arm_step_s": med[name], "rounds": runs[name],
                                "ratio_vs_seq_nchw": med[name] / med["seq_nchw"]} for name in layouts}
    report["ratio_par_cl_vs_seq_cl"] = med["par_cl"] / med["seq_cl"]
    if tcmalloc:
        report["tcmalloc"] = tcmalloc
        report["ratio_par_cl_tcmalloc_vs_par_cl"] = med[TCMALLOC_LAYOUT] / med["par_cl"]
    C.emit(report)


if __name__ == "__main__":
    main()
