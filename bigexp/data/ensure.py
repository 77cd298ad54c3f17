"""`ensure_betons`: write the .beton files a config needs, once, across ranks (rank 0 writes, the others wait).

Paths in the data section (train_beton, val_beton, train_source, val_source) are used as given: a relative one is
taken from the working directory of the process, not from the config file's folder (only `base:` is resolved
against the file). Errors about missing files say so.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional

from bigexp.data.beton import WriteResult, check_beton, relative_path_note
from bigexp.data.fmnist import write_fashion_mnist
from bigexp.data.imagefolder import write_imagefolder
from bigexp.errors import DataError


def _failure_marker(beton: Path) -> Path:
    return beton.with_name(beton.name + ".failed")


def _write_one(cfg, which: str, out: Path, progress: bool) -> WriteResult:
    source = cfg.train_source if which == "train" else cfg.val_source
    if cfg.dataset == "fashion_mnist":
        return write_fashion_mnist(source, out, size=cfg.fmnist_size,
                                   split="train" if which == "train" else "test", progress=progress)
    return write_imagefolder(source, out, max_res=cfg.write_max_res, jpeg_quality=cfg.write_jpeg_quality,
                             compress_probability=cfg.write_compress_probability,
                             write_mode=cfg.write_mode, skip_corrupt=cfg.skip_corrupt, progress=progress)


def _missing(cfg, targets: dict) -> dict:
    """{"train"/"val": path} of the files to write; DataError when they cannot or may not be written."""
    missing = {k: p for k, p in targets.items() if not p.exists()}
    if missing and targets["train"].resolve() == targets["val"].resolve():
        # One file for both (smoke tests, sample data): write it once, and only from one source.
        if cfg.dataset == "fashion_mnist" or cfg.train_source != cfg.val_source:
            raise DataError(f"data.train_beton and data.val_beton are the same file {targets['train']}, "
                            f"which would be written from different data (train_source={cfg.train_source}, "
                            f"val_source={cfg.val_source}; Fashion-MNIST: train vs test split)")
        missing.pop("val", None)
    if missing and not cfg.write_missing:
        names = ", ".join(f"data.{k}_beton={p}" for k, p in missing.items())
        note = next((relative_path_note(p) for p in missing.values() if relative_path_note(p)), "")
        raise DataError(f"missing .beton file(s) and data.write_missing is false: {names}{note}")
    return missing


def _write_missing(cfg, missing: dict, progress: bool) -> list:
    """Rank 0: write each missing file; on failure leave `<beton>.failed` (the reason) for the waiting ranks."""
    written: list = []
    for which, out in missing.items():
        marker = _failure_marker(out)
        if marker.exists():
            marker.unlink()
        try:
            written.append(_write_one(cfg, which, out, progress))
        except BaseException as exc:
            try:
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.write_text(f"{type(exc).__name__}: {exc}\n")
            except OSError:
                pass
            raise
    return written


def _wait_for_rank0(missing: dict, barrier: Optional[Callable[[], None]], poll_s: float, timeout_s: float) -> None:
    """Other ranks: return once every missing file exists; DataError if rank 0 failed, or after timeout_s."""
    start = time.time()
    if barrier is not None:
        barrier()
    pending = dict(missing)
    while pending:
        for which, out in list(pending.items()):
            if out.exists():
                del pending[which]
                continue
            marker = _failure_marker(out)
            # A marker older than our wait is left over from an earlier run: ignore it.
            if marker.exists() and marker.stat().st_mtime >= start - 5.0:
                raise DataError(f"{out}: rank 0 failed to write it: {marker.read_text().strip()}")
            if barrier is not None:
                raise DataError(f"{out}: still missing after rank 0 finished writing")
        if pending:
            if time.time() - start > timeout_s:
                raise DataError(f"timed out after {timeout_s:.0f}s waiting for rank 0 to write "
                                + ", ".join(str(p) for p in pending.values()))
            time.sleep(poll_s)


def ensure_betons(cfg, *, rank: int = 0, world_size: int = 1, progress: bool = True,
                  barrier: Optional[Callable[[], None]] = None, poll_s: float = 0.5,
                  timeout_s: float = 24 * 3600.0) -> dict:
    """Make sure cfg.train_beton and cfg.val_beton exist, writing missing ones from
    cfg.train_source / cfg.val_source when cfg.write_missing (cfg: a `DataConfig`).

    Rank 0 writes; other ranks wait. With `barrier` (e.g. torch.distributed.barrier) every rank
    calls it once after rank 0 is done; without it the waiting ranks poll for the final file name
    (it only appears once complete, via os.replace) and for a `<beton>.failed` marker that rank 0
    leaves if writing fails, so nobody waits forever. Returns {"train": path, "val": path,
    "written": [WriteResult, ...]} (written is empty on ranks other than 0).
    """
    targets = {"train": Path(cfg.train_beton), "val": Path(cfg.val_beton)}
    missing = _missing(cfg, targets)
    written: list = []
    if rank == 0:
        error = None
        try:
            written = _write_missing(cfg, missing, progress)
        except BaseException as exc:
            error = exc
        if barrier is not None and world_size > 1:
            barrier()
        if error is not None:
            raise error
    else:
        _wait_for_rank0(missing, barrier, poll_s, timeout_s)
    for p in targets.values():
        check_beton(p)
    return {"train": str(targets["train"]), "val": str(targets["val"]), "written": written}
