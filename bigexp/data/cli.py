"""`bigexp data ...`: write FFCV .beton files.

  bigexp data imagefolder SRC OUT [--max-res 256 --jpeg-quality 90 --compress-probability 0.5
                                   --write-mode proportion --num-workers N --skip-corrupt]
  bigexp data fmnist IDX_DIR OUT_DIR [--size 32 --split both|train|test]
  bigexp data write --config X [KEY=VALUE ...]     # the train/val betons a config needs
  bigexp data verify FILE [FILE ...] [--record]    # full sha256 against each file's record; exit 2 if one is bad

A bad data file (DataError) reaches the dispatcher, which prints it and exits 2 (bigexp.errors).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from bigexp.config import ConfigError, load_config
from bigexp.data import integrity
from bigexp.data.beton import WRITE_MODES, check_beton, import_ffcv, record_beton
from bigexp.data.ensure import ensure_betons
from bigexp.data.fmnist import write_fashion_mnist
from bigexp.data.imagefolder import write_imagefolder
from bigexp.errors import DataError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_cmd", required=True, metavar="{imagefolder,fmnist,write}")

    p = sub.add_parser("imagefolder", help="ImageFolder tree (<src>/<wnid>/*.JPEG) -> .beton")
    p.add_argument("src", help="ImageFolder root; sorted class-folder names give the label indices")
    p.add_argument("out", help="output .beton path (the class list goes to <out>.classes.json)")
    p.add_argument("--max-res", type=int, default=256, help="longest side stored, px (default 256)")
    p.add_argument("--jpeg-quality", type=int, default=90, help="1..100 (default 90)")
    p.add_argument("--compress-probability", type=float, default=0.5,
                   help="fraction stored as JPEG with --write-mode proportion (default 0.5)")
    p.add_argument("--write-mode", choices=WRITE_MODES, default="proportion")
    p.add_argument("--num-workers", type=int, default=None, help="writer processes (default: all cores)")
    p.add_argument("--skip-corrupt", action="store_true", help="leave out unreadable images, reporting them")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("fmnist", help="Fashion-MNIST idx files -> fmnist_train.beton / fmnist_test.beton")
    p.add_argument("idx_dir", help="directory with {train,t10k}-{images-idx3,labels-idx1}-ubyte.gz")
    p.add_argument("out_dir", help="output directory")
    p.add_argument("--size", type=int, default=32, help="image side, px (28 = native, no resize; default 32)")
    p.add_argument("--split", choices=["both", "train", "test"], default="both")
    p.add_argument("--limit", type=int, default=None, help="only the first N samples per split (smoke tests)")
    p.add_argument("--num-workers", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("write", help="write the train/val .beton files a config names, if missing")
    p.add_argument("--config", required=True, metavar="PATH", help="YAML config")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. data.write_max_res=160")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("verify", help="check .beton files against their recorded size and sha256 (exit 2: bad)")
    p.add_argument("files", nargs="+", metavar="FILE", help=".beton files")
    p.add_argument("--record", action="store_true",
                   help="for a file with no record (written before bigexp kept them): record its hash now")
    p.add_argument("--no-progress", action="store_true")


def _report(res) -> None:
    skipped = f", skipped {res.num_skipped} unreadable" if res.num_skipped else ""
    print(f"wrote {res.path}: {res.num_samples} samples, {res.bytes / 2**20:.1f} MiB, "
          f"{res.seconds:.1f} s{skipped}")


def _verify_one(path: Path, record: bool, progress: bool) -> bool:
    """Print one line for `path` ("ok ..." / "BAD ..."); True if it is good."""
    import_ffcv()  # before the clock starts: the speed printed is the check's, not ffcv's import
    t0 = time.perf_counter()
    try:
        n = check_beton(path, full_hash=True, progress=progress)
    except DataError as exc:
        print(f"BAD {exc}" if str(exc).startswith(str(path)) else f"BAD {path}: {exc}", flush=True)
        return False
    seconds = time.perf_counter() - t0
    size = path.stat().st_size
    if integrity.read_sidecar(path) is not None:
        speed = f"{size / 1e6 / max(seconds, 1e-9):.0f} MB/s"
        print(f"ok  {path}: {n} samples, {size / 2**20:.1f} MiB, sha256 as recorded ({seconds:.1f} s, {speed})")
    elif record:
        print(f"ok  {path}: {n} samples, structure ok; no recorded hash, recorded now in "
              f"{record_beton(path).name}")
    else:
        print(f"ok  {path}: {n} samples, structure ok; no recorded hash (written before bigexp kept them; "
              f"--record records it now)")
    return True


def run(args: argparse.Namespace) -> int:
    progress = not args.no_progress
    if args.data_cmd == "verify":
        good = [_verify_one(Path(f), args.record, progress) for f in args.files]
        if not all(good):
            print(f"bigexp data verify: {good.count(False)} of {len(good)} file(s) bad", file=sys.stderr)
            return 2
        return 0
    try:
        if args.data_cmd == "imagefolder":
            res = write_imagefolder(args.src, args.out, max_res=args.max_res, jpeg_quality=args.jpeg_quality,
                                    compress_probability=args.compress_probability,
                                    write_mode=args.write_mode, num_workers=args.num_workers,
                                    skip_corrupt=args.skip_corrupt, progress=progress)
            _report(res)
            for p in res.skipped:
                print(f"  skipped {p}")
        elif args.data_cmd == "fmnist":
            splits = ["train", "test"] if args.split == "both" else [args.split]
            for split in splits:
                _report(write_fashion_mnist(args.idx_dir, args.out_dir, size=args.size, split=split,
                                            limit=args.limit, num_workers=args.num_workers,
                                            progress=progress))
        else:
            try:
                cfg = load_config(args.config, list(args.overrides))
            except ConfigError as exc:
                print(f"bigexp data: config error: {exc}", file=sys.stderr)
                return 2
            out = ensure_betons(cfg.data, progress=progress)
            for res in out["written"]:
                _report(res)
            if not out["written"]:
                print(f"nothing to write: {out['train']} and {out['val']} exist")
    except DataError:
        raise  # bad input: the dispatcher prints it and exits 2
    except (ValueError, OSError) as exc:
        print(f"bigexp data: error: {exc}", file=sys.stderr)
        return 1
    return 0
