"""bigexp's FFCV train loader vs torchvision ImageFolder + DataLoader (PIL), images/s per epoch.

Same images (the 1,000 real JPEGs of ../shared/data/imagenet-sample/val by default), same transforms
(random-resized-crop 224 + horizontal flip + ImageNet normalisation, float32 out), same batch size, same
worker count (FFCV: decoding threads; DataLoader: worker processes, kept alive across epochs), drop_last on
both. Arms:
  pil          torchvision.datasets.ImageFolder + DataLoader, PIL decoding of the original JPEGs
  ffcv_full    bigexp.data.loaders.build_train_loader on a .beton written at full resolution, every image
               re-encoded as JPEG (quality 90): the equal-inputs comparison (same pixels, JPEG decode on both)
  ffcv_256     the same loader on a .beton written with bigexp's defaults (write_max_res 256, half JPEG q90,
               half raw): what bigexp trains on
Each measurement is one epoch; arms alternate (A B C, C B A, ...) after one warm-up epoch each; figures are
medians over rounds; ratio = median over rounds of (ffcv images/s / pil images/s) within the round.

    python bench/data.py [--rounds 3] [--batch-size 50] [--workers 2] [--images N] [--source DIR]

The .beton files go to bench/out/data/ (reused when present). Prints ONE JSON object on stdout.
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

TARGET_RATIO = 2.0  # ffcv_full images/s over pil images/s
RES = 224


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default=str(C.IMAGENET_SAMPLE), help="ImageFolder root <root>/<class>/*.JPEG")
    p.add_argument("--images", type=int, default=None, help="use only the first N images (smoke tests)")
    p.add_argument("--rounds", type=int, default=3, help="measured epochs per arm (after one warm-up epoch)")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 8),
                   help="FFCV decoding threads = DataLoader worker processes")
    p.add_argument("--arms", default="pil,ffcv_full,ffcv_256")
    p.add_argument("--out", default=str(C.OUT_DIR / "data"), help="where the .beton files are written/reused")
    p.add_argument("--rewrite", action="store_true", help="rewrite the .beton files even if present")
    return p.parse_args(argv)


def ffcv_arm(beton: Path, args):
    from bigexp.config.schema import DataConfig
    from bigexp.data.loaders import build_train_loader

    cfg = DataConfig(dataset="imagenet", train_beton=str(beton), val_beton=str(beton), num_workers=args.workers,
                     min_res=RES, max_res=RES, val_res=RES, random_crop=True)
    threads = torch.get_num_threads()
    loader = build_train_loader(cfg, batch_size=args.batch_size, rank=0, world_size=1, seed=0)
    torch.set_num_threads(threads)
    state = {"epoch": 0}

    def epoch() -> float:
        loader.set_epoch(state["epoch"])
        state["epoch"] += 1
        t = C.timer()
        n = sum(x.shape[0] for x, _ in loader)
        dt = t()
        torch.set_num_threads(threads)
        return n / dt
    return epoch, len(loader) * args.batch_size


def pil_arm(source: Path, args):
    from torchvision import datasets, transforms
    from bigexp.data.loaders import IMAGENET_MEAN, IMAGENET_STD

    tf = transforms.Compose([transforms.RandomResizedCrop(RES), transforms.RandomHorizontalFlip(),
                             transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    ds = datasets.ImageFolder(str(source), transform=tf)
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                         num_workers=args.workers, persistent_workers=args.workers > 0,
                                         generator=torch.Generator().manual_seed(0))

    def epoch() -> float:
        t = C.timer()
        n = sum(x.shape[0] for x, _ in loader)
        return n / t()
    return epoch, len(loader) * args.batch_size


def main(argv=None) -> int:
    args = parse(argv)
    report = C.base_report("data", args)
    source, out, tag = C.image_source(args)
    arms_wanted = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = set(arms_wanted) - {"pil", "ffcv_full", "ffcv_256"}
    if unknown:
        raise SystemExit(f"--arms: unknown arm(s) {sorted(unknown)}")

    betons, arms, per_epoch = {}, {}, {}
    if "ffcv_full" in arms_wanted:
        # max_res far above any ImageNet image: stored at the original size, every image as JPEG q90.
        betons["ffcv_full"] = C.ensure_beton(source, out / f"{tag}_full_jpg90.beton", rewrite=args.rewrite,
                                           max_res=1 << 14, write_mode="jpg", jpeg_quality=90)
    if "ffcv_256" in arms_wanted:
        betons["ffcv_256"] = C.ensure_default_beton(source, out, tag, rewrite=args.rewrite)
    for name in arms_wanted:
        if name == "pil":
            arms[name], per_epoch[name] = pil_arm(source, args)
        else:
            arms[name], per_epoch[name] = ffcv_arm(Path(betons[name]["path"]), args)
    C.log(f"arms {list(arms)}, {per_epoch} images per epoch, {args.workers} workers, batch {args.batch_size}")
    res = C.alternate(arms, rounds=args.rounds, warmup=1)
    report["images_per_epoch"] = per_epoch
    report["betons"] = betons
    report["images_per_s"] = {n: C.summary(v) for n, v in res.items()}
    med = {n: report["images_per_s"][n]["median"] for n in res}
    report["ratio"] = {}
    report["ratio_per_round"] = {}
    report["ratio_of_medians"] = {}
    if "pil" in med:
        for n in med:
            if n != "pil":
                # paired per round (the arms' epochs ran back to back), median over rounds: cancels drift
                per = [a / b for a, b in zip(res[n], res["pil"])]
                report["ratio_per_round"][f"{n}/pil"] = per
                report["ratio"][f"{n}/pil"] = C.summary(per)["median"]
                report["ratio_of_medians"][f"{n}/pil"] = med[n] / med["pil"]
    report["target"] = f"ffcv_full / pil images/s >= {TARGET_RATIO} (equal inputs)"
    if "ffcv_full/pil" in report["ratio"]:
        report["meets_target"] = report["ratio"]["ffcv_full/pil"] >= TARGET_RATIO
    report["notes"].append("output layouts differ as each pipeline produces them: ffcv channels-last (bigexp's "
                           "default), torchvision NCHW-contiguous; both float32 normalised on the CPU")
    C.emit(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
