"""Writing FFCV .beton files: ImageFolder trees (ImageNet layout) and the shared machinery.

Every file is written under a temporary name in the destination directory, fsynced and then
`os.replace`d onto its final name, so a crash or a bad image never leaves a half-written .beton
where a loader (or a waiting rank) would take it for a finished one.
"""
from __future__ import annotations

import ctypes
import json
import multiprocessing as mp
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from bigexp.errors import DataError  # noqa: F401  (re-exported)
from bigexp.atomic import atomic_open, fsync_dir

# Extensions torchvision's ImageFolder accepts; ImageNet itself is all .JPEG.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
WRITE_MODES = ("raw", "jpg", "proportion", "smart")
# The two fields every bigexp .beton holds, in this order.
EXPECTED_FIELDS = ("image", "label")


def import_ffcv() -> None:
    """Import ffcv without losing the caller's torch thread count: ffcv's compiler module calls
    torch.set_num_threads(1) at import time. Every bigexp.data entry point that touches ffcv
    calls this first; later imports are then no-ops."""
    if "ffcv" in sys.modules:
        return
    import torch
    threads = torch.get_num_threads()
    try:
        import ffcv  # noqa: F401  (imports loader, writer and the compiler)
    finally:
        torch.set_num_threads(threads)




@dataclass
class WriteResult:
    """What a writer produced. `seconds` is wall-clock time of the whole write."""
    path: str
    num_samples: int
    classes_path: Optional[str] = None
    num_skipped: int = 0
    skipped: list = field(default_factory=list)
    seconds: float = 0.0
    bytes: int = 0


# ----------------------------------------------------------------------------------------------
# Atomic file helpers
# ----------------------------------------------------------------------------------------------

def temp_path_for(final: Path) -> Path:
    """A unique temporary name in the same directory (os.replace is only atomic within a filesystem)."""
    final = Path(final)
    return final.with_name(f".{final.name}.tmp-{os.getpid()}-{time.monotonic_ns()}")


def fsync_and_replace(tmp: Path, final: Path) -> None:
    """Make a file another writer produced at `tmp` durable, then rename it into place."""
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, final)
    fsync_dir(Path(final).parent)


def write_json_atomic(obj, final: Path) -> None:
    with atomic_open(final, "w") as fh:
        json.dump(obj, fh, indent=1, sort_keys=False)
        fh.write("\n")


def classes_path_for(beton: Path) -> Path:
    """The class list (name -> index JSON) sits beside the .beton: <out>.classes.json."""
    beton = Path(beton)
    return beton.with_name(beton.name + ".classes.json")


# ----------------------------------------------------------------------------------------------
# A DatasetWriter that cannot hang
# ----------------------------------------------------------------------------------------------

def _guarded_worker(error_queue, work_fn, *args):
    """Run an FFCV writer worker; on failure hand the message to the parent before dying."""
    try:
        work_fn(*args)
    except BaseException as exc:
        error_queue.put(f"{type(exc).__name__}: {exc}")
        raise


def _make_safe_writer_class():
    """FFCV's DatasetWriter polls a shared counter until every sample is written: if a worker dies
    (an exception while encoding), the parent spins forever and the other workers block waiting for
    the dead one's page. This subclass polls the worker processes too, terminates them all on the
    first failure and raises. Apart from that and the optional progress bar, `_write_common` is
    FFCV 1.0.2's own.
    """
    import_ffcv()
    from ffcv.writer import DatasetWriter
    from ffcv.memory_allocator import MemoryAllocator
    from tqdm import tqdm

    class SafeDatasetWriter(DatasetWriter):
        def __init__(self, fname, fields, *, num_workers=-1, progress=True, desc=None, final=None, **kw):
            super().__init__(fname, fields, num_workers=num_workers, **kw)
            self.final = final or fname
            self.progress = progress
            self.desc = desc

        def _write_common(self, num_samples, queue_content, work_fn, extra_worker_args):
            self.num_samples = num_samples
            self.prepare()
            try:
                workqueue = mp.Queue()
                for todo in queue_content:
                    workqueue.put(todo)
                allocations_queue = mp.Queue()
                for _ in range(self.num_workers):
                    workqueue.put(None)
                done_number = mp.Value(ctypes.c_uint64, 0)
                allocator = MemoryAllocator(self.fname, self.data_region_start, self.page_size)
                worker_args = (workqueue, self.metadata_sm, self.metadata_type, self.fields,
                               allocator, done_number, allocations_queue, *extra_worker_args)
                errors = mp.Queue()
                processes = [mp.Process(target=_guarded_worker, args=(errors, work_fn, *worker_args))
                             for _ in range(self.num_workers)]
                for p in processes:
                    p.start()
                bar = tqdm(total=self.num_samples, desc=self.desc, disable=not self.progress)
                allocation_list = []
                collected = 0
                previous = 0
                try:
                    while collected < len(processes):
                        val = done_number.value
                        if val > previous:
                            bar.update(val - previous)
                            previous = val
                        # Drain allocations as they arrive: a worker blocks on exit until its queue
                        # item is consumed, so waiting for exit first could deadlock.
                        while True:
                            try:
                                allocation_list.extend(allocations_queue.get(timeout=0.05))
                                collected += 1
                            except Exception:  # queue.Empty
                                break
                        failed = [p for p in processes if p.exitcode not in (None, 0)]
                        if failed:
                            try:
                                reason = errors.get(timeout=1.0)
                            except Exception:
                                reason = f"exit code {failed[0].exitcode}, no message"
                            raise DataError(f"writing {self.final} failed in a writer process: {reason}")
                    bar.update(max(0, int(done_number.value) - previous))
                finally:
                    bar.close()
                    for p in processes:
                        if p.is_alive() and collected < len(processes):
                            p.terminate()
                    for p in processes:
                        p.join(timeout=10)
                self.finalize(allocation_list)
            finally:
                self.metadata_sm.close()
                self.metadata_sm.unlink()

    return SafeDatasetWriter


def write_indexed_dataset(dataset, out_path, fields: dict, *, num_workers: Optional[int] = None,
                          progress: bool = True, desc: Optional[str] = None, chunksize: int = 100) -> int:
    """Write `dataset` (indexable, items are tuples in `fields` order) to `out_path` atomically.

    Returns the file size in bytes. A failure anywhere leaves nothing under `out_path`
    (an existing file there is untouched until the new one is complete).
    """
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(out_path)
    workers = num_workers if num_workers and num_workers > 0 else os.cpu_count() or 1
    workers = max(1, min(workers, len(dataset) // chunksize + 1))
    Writer = _make_safe_writer_class()
    try:
        writer = Writer(str(tmp), fields, num_workers=workers, progress=progress, desc=desc, final=str(out_path))
        writer.from_indexed_dataset(dataset, chunksize=chunksize)
        fsync_and_replace(tmp, out_path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out_path.stat().st_size


# ----------------------------------------------------------------------------------------------
# Checking an existing .beton
# ----------------------------------------------------------------------------------------------

def check_beton(path) -> int:
    """Raise DataError naming `path` unless it is a .beton with exactly the fields
    image (RGBImageField) and label (IntField). Returns the number of samples."""
    import_ffcv()
    from ffcv.fields import IntField, RGBImageField
    from ffcv.reader import Reader

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: .beton file not found")
    try:
        reader = Reader(str(path))
    except Exception as exc:  # corrupt header, wrong version, truncated file ...
        raise DataError(f"{path}: not a readable FFCV .beton file ({type(exc).__name__}: {exc})") from exc
    want = {"image": RGBImageField, "label": IntField}
    got = {name: type(h).__name__ for name, h in reader.handlers.items()}
    if list(reader.handlers) != list(EXPECTED_FIELDS) or not all(
            isinstance(reader.handlers[k], t) for k, t in want.items()):
        raise DataError(f"{path}: .beton has fields {got}; expected "
                        f"{{'image': 'RGBImageField', 'label': 'IntField'}} (write it with `bigexp data`)")
    if int(reader.num_samples) == 0:
        raise DataError(f"{path}: .beton holds no samples")
    return int(reader.num_samples)


# ----------------------------------------------------------------------------------------------
# ImageFolder
# ----------------------------------------------------------------------------------------------

def scan_imagefolder(src_dir) -> tuple[list[str], list[tuple[str, int]]]:
    """(sorted class names, [(file path, class index)]) of an ImageFolder tree <src>/<class>/<img>.

    Sorted class-folder names give the standard ImageNet indices (sorted wnids). Raises DataError
    naming the path for a missing/non-directory source, a source without class folders, or a class
    folder without images.
    """
    src = Path(src_dir)
    if not src.exists():
        raise DataError(f"{src}: image directory does not exist")
    if not src.is_dir():
        raise DataError(f"{src}: not a directory (expected an ImageFolder root <root>/<class>/*.JPEG)")
    classes = sorted(p.name for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{src}: no class folders (expected an ImageFolder root <root>/<class>/*.JPEG)")
    samples = []
    for idx, name in enumerate(classes):
        files = sorted(p for p in (src / name).iterdir()
                       if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise DataError(f"{src / name}: class folder has no images ({', '.join(IMAGE_EXTENSIONS)})")
        samples.extend((str(p), idx) for p in files)
    return classes, samples


def load_rgb(path: str) -> np.ndarray:
    """Fully decode an image file to an HxWx3 uint8 array (CMYK/grayscale/palette converted)."""
    from PIL import Image
    with Image.open(path) as im:
        im.load()  # a full decode: Image.verify() misses truncated JPEGs
        return np.asarray(im.convert("RGB"))


def _check_one(path: str) -> Optional[str]:
    try:
        load_rgb(path)
        return None
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


def find_corrupt(paths: Sequence[str], *, num_workers: int = 1, progress: bool = True) -> list[tuple[str, str]]:
    """[(path, reason)] for every file PIL cannot fully decode."""
    from tqdm import tqdm
    bad = []
    chunks = max(1, min(64, len(paths) // (4 * max(num_workers, 1)) or 1))
    if num_workers > 1 and len(paths) > 200:
        with mp.get_context("fork").Pool(num_workers) as pool:
            results = pool.imap(_check_one, paths, chunksize=chunks)
            for path, reason in tqdm(zip(paths, results), total=len(paths), desc="validate images",
                                     disable=not progress):
                if reason is not None:
                    bad.append((path, reason))
    else:
        for path in tqdm(paths, desc="validate images", disable=not progress):
            reason = _check_one(path)
            if reason is not None:
                bad.append((path, reason))
    return bad


class _ImageFolderSamples:
    """Indexable (image, label) source for FFCV's writer; decoding happens in the writer workers."""

    def __init__(self, samples):
        self.samples = samples

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        try:
            return load_rgb(path), int(label)
        except Exception as exc:  # only reachable if the file changed after validation
            raise DataError(f"{path}: cannot decode image ({exc})") from exc


def write_imagefolder(src_dir, out_path, *, max_res: int = 256, jpeg_quality: int = 90,
                      compress_probability: float = 0.5, write_mode: str = "proportion",
                      num_workers: Optional[int] = None, skip_corrupt: bool = False,
                      progress: bool = True) -> WriteResult:
    """ImageFolder tree (ImageNet layout, <src>/<wnid>/*.JPEG) -> FFCV .beton with fields
    image (RGBImageField) and label (IntField, index into the sorted class names).

    max_res: longest side stored (px, > 0; smaller images are kept as they are).
    jpeg_quality: 1..100, for images stored as JPEG.
    compress_probability: 0..1, fraction stored as JPEG when write_mode == "proportion".
    write_mode: raw | jpg | proportion | smart (FFCV's RGBImageField modes).
    num_workers: writer processes (None = all cores).
    skip_corrupt: leave out files PIL cannot decode (reported in the result) instead of failing.

    Also writes <out>.classes.json: {"classes": [names], "class_to_idx": {name: index}}.
    """
    import_ffcv()
    from ffcv.fields import IntField, RGBImageField

    t0 = time.perf_counter()
    if write_mode not in WRITE_MODES:
        raise ValueError(f"write_mode={write_mode!r}: expected one of {WRITE_MODES}")
    if not (1 <= int(jpeg_quality) <= 100):
        raise ValueError(f"jpeg_quality={jpeg_quality}: expected 1..100")
    if not (0.0 <= float(compress_probability) <= 1.0):
        raise ValueError(f"compress_probability={compress_probability}: expected 0..1")
    if int(max_res) <= 0:
        raise ValueError(f"max_res={max_res}: expected > 0")
    out_path = Path(out_path)
    classes, samples = scan_imagefolder(src_dir)
    workers = num_workers if num_workers and num_workers > 0 else (os.cpu_count() or 1)

    bad = find_corrupt([p for p, _ in samples], num_workers=workers, progress=progress)
    if bad and not skip_corrupt:
        listing = "\n".join(f"  {p}: {r}" for p, r in bad[:20])
        more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
        raise DataError(f"{len(bad)} unreadable image(s) under {src_dir} (pass skip_corrupt / "
                        f"--skip-corrupt to leave them out):\n{listing}{more}")
    if bad:
        bad_set = {p for p, _ in bad}
        samples = [s for s in samples if s[0] not in bad_set]
        if progress:
            print(f"skipped {len(bad)} unreadable image(s) under {src_dir}, e.g. {bad[0][0]}")
        if not samples:
            raise DataError(f"{src_dir}: every image is unreadable")

    fields = {
        "image": RGBImageField(write_mode=write_mode, max_resolution=int(max_res),
                               jpeg_quality=int(jpeg_quality),
                               compress_probability=float(compress_probability)),
        "label": IntField(),
    }
    classes_path = classes_path_for(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    # Class list first: the .beton appearing under its final name is the "all done" signal.
    write_json_atomic({"source": str(src_dir), "classes": classes,
                       "class_to_idx": {c: i for i, c in enumerate(classes)}}, classes_path)
    size = write_indexed_dataset(_ImageFolderSamples(samples), out_path, fields, num_workers=workers,
                                 progress=progress, desc=f"write {out_path.name}")
    return WriteResult(path=str(out_path), num_samples=len(samples), classes_path=str(classes_path),
                       num_skipped=len(bad), skipped=[p for p, _ in bad],
                       seconds=time.perf_counter() - t0, bytes=size)


# ----------------------------------------------------------------------------------------------
# ensure_betons: write what a config needs, once, across ranks
# ----------------------------------------------------------------------------------------------

def _failure_marker(beton: Path) -> Path:
    return beton.with_name(beton.name + ".failed")


def _write_one(cfg, which: str, out: Path, progress: bool) -> WriteResult:
    source = cfg.train_source if which == "train" else cfg.val_source
    if cfg.dataset == "fashion_mnist":
        from bigexp.data.fmnist import write_fashion_mnist
        return write_fashion_mnist(source, out, size=cfg.fmnist_size,
                                   split="train" if which == "train" else "test", progress=progress)
    return write_imagefolder(source, out, max_res=cfg.write_max_res, jpeg_quality=cfg.write_jpeg_quality,
                             compress_probability=cfg.write_compress_probability,
                             write_mode=cfg.write_mode, skip_corrupt=cfg.skip_corrupt, progress=progress)


def ensure_betons(cfg, *, rank: int = 0, world_size: int = 1, progress: bool = True,
                  barrier: Optional[Callable[[], None]] = None, poll_s: float = 0.5,
                  timeout_s: float = 24 * 3600.0) -> dict:
    """Make sure cfg.train_beton and cfg.val_beton exist, writing missing ones from
    cfg.train_source / cfg.val_source when cfg.write_missing.

    Rank 0 writes; other ranks wait. With `barrier` (e.g. torch.distributed.barrier) every rank
    calls it once after rank 0 is done; without it the waiting ranks poll for the final file name
    (it only appears once complete, via os.replace) and for a `<beton>.failed` marker that rank 0
    leaves if writing fails, so nobody waits forever. Returns {"train": path, "val": path,
    "written": [WriteResult, ...]} (written is empty on ranks other than 0).
    """
    targets = {"train": Path(cfg.train_beton), "val": Path(cfg.val_beton)}
    missing = {k: p for k, p in targets.items() if not p.exists()}
    if missing and targets["train"].resolve() == targets["val"].resolve():
        # One file for both (smoke tests, sample data): write it once, and only from one source.
        if cfg.dataset == "fashion_mnist" or cfg.train_source != cfg.val_source:
            raise DataError(f"data.train_beton and data.val_beton are the same file {targets['train']}, "
                            f"which would be written from different data (train_source={cfg.train_source}, "
                            f"val_source={cfg.val_source}; Fashion-MNIST: train vs test split)")
        missing.pop("val", None)
    written: list = []
    if missing and not cfg.write_missing:
        names = ", ".join(f"data.{k}_beton={p}" for k, p in missing.items())
        raise DataError(f"missing .beton file(s) and data.write_missing is false: {names}")

    if rank == 0:
        error = None
        try:
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
        except BaseException as exc:
            error = exc
        if barrier is not None and world_size > 1:
            barrier()
        if error is not None:
            raise error
    else:
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
    for p in targets.values():
        check_beton(p)
    return {"train": str(targets["train"]), "val": str(targets["val"]), "written": written}
