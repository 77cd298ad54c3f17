"""What every benchmark shares: a clean stdout for the one JSON object, machine and version facts,
A/B alternation after warm-up, and medians.

Why stdout is taken over at import: DeepSpeed's logger, ffcv and DataLoader workers write to fd 1. The
benchmarks promise exactly one JSON object on stdout, so fd 1 is pointed at stderr for the whole run
(children inherit it) and `emit` writes to a saved copy of the original stdout.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

from _launch import IMAGENET_SAMPLE, REPO  # noqa: F401  (IMAGENET_SAMPLE: the default source of data.py, gpu.py)

# Before torch (libgomp) is loaded: OpenMP threads that spin while waiting turn a 2-thread step into a 10x
# slower one as soon as the cores are oversubscribed (measured here: resnet18 step 0.06 s -> 7 s with other jobs
# running). Passive waiting costs little on an idle machine and keeps a shared one measurable. Both arms of every
# comparison run under the same policy; an explicit OMP_WAIT_POLICY in the environment wins.
OMP_POLICY_SET_HERE = "OMP_WAIT_POLICY" not in os.environ
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

if str(REPO) not in sys.path:  # bigexp from this checkout, installed or not
    sys.path.insert(0, str(REPO))
OUT_DIR = REPO / "bench" / "out"   # gitignored: written data (betons) and scratch

_JSON_FD: int | None = None


def take_stdout() -> None:
    """Send everything written to fd 1 (by us, libraries, child processes) to stderr; keep the real stdout for
    `emit`. Idempotent."""
    global _JSON_FD
    if _JSON_FD is not None:
        return
    sys.stdout.flush()
    _JSON_FD = os.dup(1)
    os.dup2(2, 1)


def emit(obj: dict) -> None:
    """Write `obj` as ONE line of JSON to the real stdout."""
    text = json.dumps(obj, sort_keys=False, default=_json_default) + "\n"
    sys.stdout.flush()
    sys.stderr.flush()
    fd = _JSON_FD if _JSON_FD is not None else 1
    os.write(fd, text.encode())


def _json_default(o):
    try:
        return float(o)
    except Exception:
        return str(o)


def log(*args) -> None:
    print("[bench]", *args, file=sys.stderr, flush=True)


def machine() -> dict:
    # imported here, as torch is everywhere in this module: after the OpenMP policy above is in the environment
    import torch

    from bigexp.doctor.environment import cpu_model

    info = {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "gpu": None, "hostname": platform.node()}
    try:
        info["load_avg_1m_at_start"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    info["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY") + (" (set by bench)" if OMP_POLICY_SET_HERE else "")
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
    return info


def versions() -> dict:
    from importlib import metadata

    out = {"python": platform.python_version()}
    # Distribution metadata, not module.__version__: ffcv 1.0.2's module still says 0.0.3rc1.
    for mod, dist in (("torch", "torch"), ("torchvision", "torchvision"), ("deepspeed", "deepspeed"),
                      ("ffcv", "ffcv"), ("numpy", "numpy"), ("numba", "numba"), ("PIL", "pillow")):
        try:
            out[mod] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[mod] = "not installed"
    try:
        import torch
        out["cuda"] = torch.version.cuda
    except Exception:
        pass
    return out


def shared_machine_note() -> str:
    try:
        load = os.getloadavg()[0]
    except OSError:
        return ""
    cores = os.cpu_count() or 1
    if load > 0.5 * cores:
        return (f"load average {load:.1f} on {cores} cores at start: the machine was shared with other jobs; "
                "arms were alternated and medians taken to cancel drift, but absolute figures are noisy")
    return ""


def summary(xs: List[float]) -> dict:
    """median/min/max/n of a list of measurements."""
    xs = [float(x) for x in xs]
    if not xs:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def alternate(arms: Dict[str, Callable[[], float]], *, rounds: int, warmup: int = 1) -> Dict[str, List[float]]:
    """Run every arm `warmup` times (discarded), then `rounds` rounds of each arm once, alternating the order
    (A B, B A, A B ...) so a slow drift of the machine hits both arms alike. Each call returns one measurement
    (e.g. seconds per step); returns {arm: [measurement per round]}."""
    names = list(arms)
    for _ in range(warmup):
        for n in names:
            arms[n]()
    out: Dict[str, List[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        for n in order:
            out[n].append(float(arms[n]()))
        log(f"round {r + 1}/{rounds}: " + ", ".join(f"{n}={out[n][-1]:.4g}" for n in names))
    return out


def timer() -> Callable[[], float]:
    t0 = time.perf_counter()
    return lambda: time.perf_counter() - t0


def base_report(bench: str, args) -> dict:
    """The keys every benchmark's JSON starts with; `notes` already says when the machine was busy at start."""
    note = shared_machine_note()
    return {"bench": bench, "args": {k: v for k, v in vars(args).items()}, "machine": machine(),
            "versions": versions(), "notes": [note] if note else []}


def subset_tree(source: Path, n: int, out: Path) -> Path:
    """An ImageFolder of symlinks to the first n images of `source` (sorted), for small runs."""
    from bigexp.data.imagefolder import scan_imagefolder

    classes, samples = scan_imagefolder(source)
    root = out / f"subset_{source.name}_{n}"
    if root.is_dir():
        return root
    tmp = out / f".subset_{source.name}_{n}.tmp{os.getpid()}"
    for path, idx in samples[:n]:
        d = tmp / classes[idx]
        d.mkdir(parents=True, exist_ok=True)
        (d / Path(path).name).symlink_to(Path(path).resolve())
    os.replace(tmp, root)
    return root


def image_source(args) -> tuple[Path, Path, str]:
    """(the ImageFolder to read: --source, or a tree of links to its first --images images; --out, created; a tag
    naming both, for the .beton files written from it)."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    source = subset_tree(Path(args.source), args.images, out) if args.images else Path(args.source)
    return source, out, f"{Path(args.source).name}_{args.images or 'all'}"


def ensure_beton(source: Path, path: Path, *, rewrite: bool, **write_kw) -> dict:
    from bigexp.data.imagefolder import write_imagefolder

    if path.exists() and not rewrite:
        return {"path": str(path), "written": False, "bytes": path.stat().st_size}
    res = write_imagefolder(source, path, progress=False, **write_kw)
    return {"path": str(path), "written": True, "bytes": res.bytes, "write_s": res.seconds,
            "num_samples": res.num_samples}


def ensure_default_beton(source: Path, out: Path, tag: str, *, rewrite: bool) -> dict:
    """ensure_beton with the settings bigexp writes ImageNet with (DataConfig's defaults), named after them."""
    from bigexp.config.schema import DataConfig

    d = DataConfig()
    return ensure_beton(source, out / f"{tag}_max{d.write_max_res}.beton", rewrite=rewrite, max_res=d.write_max_res,
                        write_mode=d.write_mode, jpeg_quality=d.write_jpeg_quality,
                        compress_probability=d.write_compress_probability)
