"""Data-parallel scaling of bigexp's train step: 1 vs 2 ranks on gloo (torchrun), fmnist_resnet by default.

Weak scaling: a fixed batch per rank (global batch = batch x ranks), bigexp's real step (DeepSpeed engine +
ExpSGD through bigexp.run.step.train_micro_step, gradient all-reduce over gloo), fp32, `--threads` torch threads
per rank (default 1, so 2 ranks use the 2 cores one rank each). Each launch times `--steps` steps after
`--warmup` (per-step median, ranks barrier-aligned); launches alternate 1, 2, 2, 1, ... for `--rounds` rounds.
efficiency = images/s(2 ranks) / (2 x images/s(1 rank)), from the medians over rounds.

    python bench/scaling.py [--rounds 2] [--batch 128] [--steps 20] [--warmup 3] [--threads 1]

Prints ONE JSON object on stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
from _launch import GroupTimeout, child_env, run_group, torchrun_cmd  # noqa: E402

C.take_stdout()

WORKER = Path(__file__).resolve().parent / "_scaling_worker.py"


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="fmnist_resnet")
    p.add_argument("--res", type=int, default=32)
    p.add_argument("--batch", type=int, default=128, help="images per rank per step")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--ranks", default="1,2", help="comma-separated world sizes to compare")
    p.add_argument("--timeout", type=int, default=600, help="seconds per launch")
    return p.parse_args(argv)


def launch(n: int, args, out: Path) -> dict:
    cmd = torchrun_cmd([str(WORKER), str(out), args.arch, str(args.res), str(args.batch), str(args.warmup),
                        str(args.steps), str(args.threads)], nproc=n)
    try:
        proc = run_group(cmd, env=child_env(args.threads), timeout=args.timeout)
    except GroupTimeout as e:
        raise SystemExit(f"scaling: {n}-rank launch {e}") from None
    if proc.returncode != 0 or not out.exists():
        raise SystemExit(f"scaling: {n}-rank launch failed (rc {proc.returncode})\n{proc.stdout[-4000:]}")
    rec = json.loads(out.read_text())
    out.unlink()
    return rec


def main(argv=None) -> int:
    args = parse(argv)
    report = C.base_report("scaling", args)
    ranks = [int(r) for r in args.ranks.split(",")]
    runs = {n: [] for n in ranks}
    with tempfile.TemporaryDirectory(prefix="bigexp-scaling-") as tmp:
        for r in range(args.rounds):
            for n in (ranks if r % 2 == 0 else ranks[::-1]):
                rec = launch(n, args, Path(tmp) / f"r{r}_n{n}.json")
                runs[n].append(rec)
                C.log(f"round {r + 1}/{args.rounds}: {n} rank(s): {rec['images_per_s']:.1f} images/s")
    ips = {n: C.summary([x["images_per_s"] for x in v]) for n, v in runs.items()}
    report["images_per_s"] = {str(n): s for n, s in ips.items()}
    report["runs"] = {str(n): v for n, v in runs.items()}
    base = ranks[0]
    report["speedup"] = {str(n): ips[n]["median"] / ips[base]["median"] for n in ranks}
    report["efficiency"] = {str(n): ips[n]["median"] / (ips[base]["median"] * n / base) for n in ranks}
    # paired: each round's launches ran back to back (1 2, then 2 1), so their ratio cancels the machine's drift
    report["efficiency_per_round"] = {
        str(n): [a["images_per_s"] / (b["images_per_s"] * n / base) for a, b in zip(runs[n], runs[base])]
        for n in ranks}
    cores = os.cpu_count() or 1
    if max(ranks) * args.threads > cores:
        report["notes"].append(f"{max(ranks)} ranks x {args.threads} threads > {cores} cores: oversubscribed")
    report["notes"].append("weak scaling on one machine: the ranks share its cores and memory bandwidth, so "
                           "efficiency includes that contention as well as the gloo all-reduce")
    C.emit(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
