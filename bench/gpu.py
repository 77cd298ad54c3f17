"""The python part of bench/gpu.sh: one GPU, a few minutes.

  1. ResNet-50, bf16, channels-last, 224 px: bigexp's train step (DeepSpeed bf16 engine + ExpSGD through
     bigexp.run.step.train_micro_step) vs a plain PyTorch loop (torch SGD foreach, autocast bf16), same init and
     fixed batch; measurements of --steps steps alternate A/B after warm-up; images/s medians, ratio, and the
     peak GPU memory while each arm steps.
  2. bigexp's FFCV train loader (random-resized-crop 224 + flip, normalised on the GPU, bf16 out) on the
     ImageNet sample written with bigexp's defaults (max side 256 px): images/s over epochs.
Every section runs even if another fails; failures land in "errors" and make the exit status 1.

    python bench/gpu.py [--batch 128] [--steps 10] [--rounds 3] [--workers N] [--epochs 3]
    python bench/gpu.py --cpu-smoke        # tiny sizes on the CPU: checks the script, not the GPU

Prints ONE JSON object on stdout (also written to --json when given).
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

C.take_stdout()

import torch  # noqa: E402

import _arms as A  # noqa: E402

TARGET_STEP_RATIO = 0.95


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU (no GPU needed)")
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--res", type=int, default=224)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=10, help="steps per measurement")
    p.add_argument("--warmup", type=int, default=2, help="warm-up measurements per arm")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--source", default=str(C.IMAGENET_SAMPLE))
    p.add_argument("--images", type=int, default=None, help="first N images only")
    p.add_argument("--loader-batch", type=int, default=128)
    p.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 16))
    p.add_argument("--epochs", type=int, default=3, help="measured loader epochs (after one warm-up)")
    p.add_argument("--out", default=str(C.OUT_DIR / "data"), help="where the .beton is written/reused")
    p.add_argument("--json", default=None, help="also write the JSON here")
    p.add_argument("--skip", default="", help="comma-separated sections to skip: step,loader")
    a = p.parse_args(argv)
    if a.cpu_smoke:
        a.res, a.batch, a.steps, a.warmup, a.rounds = 32, 2, 1, 1, 1
        a.images = a.images or 16
        a.loader_batch, a.workers, a.epochs = 8, min(a.workers, 2), 1
    return a


def device_of(args) -> torch.device:
    if args.cpu_smoke:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py: no CUDA device visible (use --cpu-smoke to check the script on a CPU)")
    return torch.device("cuda", 0)


def step_section(args, ctx, dev) -> dict:
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    cfg = A.make_config(args.arch, args.res, args.batch, "bf16", device=dev.type)  # channels-last by default
    big, plain = A.build_pair(cfg, ctx, res=args.res, batch=args.batch)
    peaks = {"bigexp": 0, "plain": 0}

    def measured(arm):
        run = A.images_per_s(arm, args.steps, dev)

        def go():
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            v = run()
            if dev.type == "cuda":
                peaks[arm.name] = max(peaks[arm.name], torch.cuda.max_memory_allocated(dev))
            return v
        return go

    res = C.alternate({"bigexp": measured(big), "plain": measured(plain)}, rounds=args.rounds, warmup=args.warmup)
    b, p = C.summary(res["bigexp"]), C.summary(res["plain"])
    out = {"arch": args.arch, "res": args.res, "batch": args.batch, "precision": "bf16", "channels_last": True,
           "steps_per_measurement": args.steps, "bigexp_images_per_s": b, "plain_images_per_s": p,
           "ratio_per_round": [x / y for x, y in zip(res["bigexp"], res["plain"])],
           "ratio_of_medians": b["median"] / p["median"], "target_ratio_min": TARGET_STEP_RATIO}
    out["ratio"] = C.summary(out["ratio_per_round"])["median"]  # paired per round: cancels drift
    out["meets_target"] = out["ratio"] >= TARGET_STEP_RATIO
    if dev.type == "cuda":
        # peak while that arm stepped; both arms' weights/optimizer state are resident throughout
        out["peak_memory_gib"] = {k: v / 2**30 for k, v in peaks.items()}
        out["resident_gib_both_arms"] = torch.cuda.memory_allocated(dev) / 2**30
    return out


def loader_section(args, dev) -> dict:
    from bigexp.config.schema import DataConfig
    from bigexp.data.loaders import build_train_loader

    source, out_dir, tag = C.image_source(args)
    beton = C.ensure_default_beton(source, out_dir, tag, rewrite=False)
    cfg = DataConfig(dataset="imagenet", train_beton=beton["path"], val_beton=beton["path"], num_workers=args.workers,
                     min_res=224, max_res=224, val_res=224, random_crop=True)
    dtype = torch.bfloat16
    threads = torch.get_num_threads()
    loader = build_train_loader(cfg, batch_size=args.loader_batch, rank=0, world_size=1, seed=0, dtype=dtype,
                                device=str(dev))
    torch.set_num_threads(threads)
    rates = []
    for e in range(args.epochs + 1):
        loader.set_epoch(e)
        A.sync(dev)
        t = C.timer()
        n = sum(x.shape[0] for x, _ in loader)
        A.sync(dev)
        dt = t()
        torch.set_num_threads(threads)
        if e > 0:  # epoch 0 compiles the pipeline
            rates.append(n / dt)
        C.log(f"loader epoch {e}: {n / dt:.0f} images/s{' (warm-up)' if e == 0 else ''}")
    return {"beton": beton, "batch": args.loader_batch, "workers": loader.num_workers, "res": 224,
            "device": str(dev), "dtype": str(dtype), "images_per_epoch": len(loader) * args.loader_batch,
            "images_per_s": C.summary(rates)}


def main(argv=None) -> int:
    args = parse(argv)
    dev = device_of(args)
    report = C.base_report("gpu", args)
    report["errors"] = {}
    if args.cpu_smoke:
        report["notes"].append("--cpu-smoke: tiny sizes on the CPU; these figures say nothing about a GPU")
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    from bigexp.run.distributed import init_distributed, shutdown_distributed

    ctx = init_distributed(dev.type)
    if "step" not in skip:
        try:
            report["step"] = step_section(args, ctx, dev)
            C.log(f"step: ratio {report['step']['ratio']:.3f}")
        except Exception as exc:  # keep going: the loader figure is still worth having
            report["errors"]["step"] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-3000:]}"
            C.log(report["errors"]["step"])
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    if "loader" not in skip:
        try:
            report["loader"] = loader_section(args, dev)
        except Exception as exc:
            report["errors"]["loader"] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-3000:]}"
            C.log(report["errors"]["loader"])
    if args.json:
        import json
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    C.emit(report)
    shutdown_distributed()
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
