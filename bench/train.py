"""bigexp's train step (DeepSpeed engine + ExpSGD, via bigexp.run.step.train_micro_step) vs a plain PyTorch loop
(torch SGD, same model and init, same batch; bf16 via autocast), images/s, fp32 and bf16.

Cases (default): resnet18 at 224 px (ImageNet shape) and fmnist_resnet at 32 px (the Fashion-MNIST model).
Each measurement is `--steps` steps of one arm on a fixed batch; the two arms alternate (A B, B A, ...) after
a warm-up; figures are medians over rounds; ratio = median over rounds of (bigexp images/s / plain images/s)
of the round's back-to-back pair.

    python bench/train.py [--cases resnet18:224:16,fmnist_resnet:32:256] [--precisions fp32,bf16]
                          [--rounds 3] [--steps 2]

A case is ARCH:RES:BATCH (--steps may be given per case as ARCH:RES:BATCH:STEPS). Runs as one process (a
1-rank gloo group, which DeepSpeed needs). Prints ONE JSON object on stdout.
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

TARGET_RATIO = 0.95  # bigexp images/s over plain images/s
DEFAULT_CASES = "resnet18:224:16:2,fmnist_resnet:32:256:4"


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=DEFAULT_CASES, help="comma-separated ARCH:RES:BATCH[:STEPS]")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--rounds", type=int, default=3, help="measured A/B rounds after warm-up")
    p.add_argument("--warmup", type=int, default=1, help="warm-up measurements per arm")
    p.add_argument("--steps", type=int, default=None, help="steps per measurement (overrides the cases')")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    return p.parse_args(argv)


def parse_cases(text: str, steps_override):
    cases = []
    for item in text.split(","):
        parts = item.strip().split(":")
        if len(parts) not in (3, 4):
            raise SystemExit(f"--cases: {item!r} is not ARCH:RES:BATCH[:STEPS]")
        arch, res, batch = parts[0], int(parts[1]), int(parts[2])
        steps = steps_override or (int(parts[3]) if len(parts) == 4 else 2)
        cases.append((arch, res, batch, steps))
    return cases


def main(argv=None) -> int:
    args = parse(argv)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    from bigexp.run.distributed import init_distributed, shutdown_distributed

    ctx = init_distributed(args.device)
    report = C.base_report("train", args)
    report["notes"].append("plain arm: torch.optim.SGD(foreach=True) over model.parameters(), bf16 via "
                           "torch.autocast (fp32 weights); bigexp arm: DeepSpeed bf16 (bf16 weights, fp32 masters "
                           "in ExpSGD); fixed random batch, so the loader is not measured")
    report["results"] = {}
    threads = torch.get_num_threads()
    for arch, res, batch, steps in parse_cases(args.cases, args.steps):
        for prec in [p.strip() for p in args.precisions.split(",") if p.strip()]:
            key = f"{arch}@{res}px/b{batch}/{prec}"
            C.log(f"{key}: building arms")
            cfg = A.make_config(arch, res, batch, prec, device=args.device)
            big, plain = A.build_pair(cfg, ctx, res=res, batch=batch)
            torch.set_num_threads(threads)
            res_ = C.alternate({"bigexp": A.images_per_s(big, steps, ctx.device),
                                "plain": A.images_per_s(plain, steps, ctx.device)},
                               rounds=args.rounds, warmup=args.warmup)
            b, pl = C.summary(res_["bigexp"]), C.summary(res_["plain"])
            ratios = [x / y for x, y in zip(res_["bigexp"], res_["plain"])]
            report["results"][key] = {
                "arch": arch, "res": res, "batch": batch, "precision": prec, "steps_per_measurement": steps,
                "bigexp_images_per_s": b, "plain_images_per_s": pl,
                # paired: each round's two measurements were taken back to back, so their ratio cancels the
                # machine's drift; the median of those is the figure (ratio_of_medians is kept for reference)
                "ratio": C.summary(ratios)["median"], "ratio_per_round": ratios,
                "ratio_of_medians": b["median"] / pl["median"], "target_ratio_min": TARGET_RATIO,
            }
            report["results"][key]["meets_target"] = report["results"][key]["ratio"] >= TARGET_RATIO
            C.log(f"{key}: ratio {report['results'][key]['ratio']:.3f}")
            del big, plain
    report["ratio"] = {k: r["ratio"] for k, r in report["results"].items()}
    report["target"] = f"bigexp / plain images/s >= {TARGET_RATIO}"
    C.emit(report)
    shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
