"""What every bigexp .beton shares: the fields, the atomic writer that cannot hang, the class list, the check.

A .beton is written under a temporary name in its destination directory, fsynced and renamed onto its final
name, so a crash or a bad image never leaves a half-written .beton where a loader (or a waiting rank) would take
it for a finished one. The class list beside it goes through `bigexp.atomic`; the size/sha256 record beside it
(`bigexp.data.integrity`) is written from the finished temp file just before the rename, and `check_beton` holds
every load to it.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import multiprocessing as mp
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from bigexp.atomic import fsync_dir, write_text_atomic
from bigexp.data import integrity
from bigexp.errors import DataError  # noqa: F401  (re-exported: bigexp.data's error, raised throughout)

# FFCV's RGBImageField write modes.
WRITE_MODES = ("raw", "jpg", "proportion", "smart")
# The two fields every bigexp .beton holds, in this order.
EXPECTED_FIELDS = ("image", "label")
# ffcv is imported inside the functions that need it, after import_ffcv(): it is heavy (torch, numba) and its
# first import resets torch's thread count; `bigexp data --help` and the config checks never pay for it.


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


def relative_path_note(path) -> str:
    """For messages about a data path the user gave: relative ones are taken from the working directory (not from
    the config file's folder, unlike `base:`), so say which directory that was; "" for an absolute path."""
    if Path(path).is_absolute():
        return ""
    return f" (relative paths are taken from the working directory {os.getcwd()}, not from the config file's folder)"


def classes_path_for(beton: Path) -> Path:
    """The class list (name -> index JSON) sits beside the .beton: <out>.classes.json."""
    beton = Path(beton)
    return beton.with_name(beton.name + ".classes.json")


def write_classes(beton: Path, source, classes: list) -> Path:
    """Write <beton>.classes.json atomically: {"source", "classes": [names], "class_to_idx": {name: index}}."""
    path = classes_path_for(beton)
    obj = {"source": str(source), "classes": list(classes), "class_to_idx": {c: i for i, c in enumerate(classes)}}
    write_text_atomic(path, json.dumps(obj, indent=1) + "\n")
    return path


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


@contextlib.contextmanager
def _atomic_path(final: Path):
    """`bigexp.atomic.atomic_open` for a writer that opens its file BY NAME (FFCV's DatasetWriter opens, closes
    and reopens it): yields a temp path beside `final`; on success the file is fsynced and renamed onto `final`
    (then the directory fsynced), on any error it is removed. atomic_open cannot serve here: it yields an open
    handle whose `.name` is only its fd number. The temp file is created by the writer, so it gets the usual
    umask permissions (a mkstemp file would be 0600: unreadable to the rest of a team sharing the dataset)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}-{time.monotonic_ns()}")
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(final.parent)


def write_indexed_dataset(dataset, out_path, fields: dict, *, num_workers: Optional[int] = None,
                          progress: bool = True, desc: Optional[str] = None, chunksize: int = 100) -> int:
    """Write `dataset` (indexable, items are tuples in `fields` order) to `out_path` atomically.

    Returns the file size in bytes. A failure anywhere leaves nothing under `out_path`
    (an existing file there is untouched until the new one is complete).
    """
    out_path = Path(out_path)
    workers = num_workers if num_workers and num_workers > 0 else os.cpu_count() or 1
    workers = max(1, min(workers, len(dataset) // chunksize + 1))
    Writer = _make_safe_writer_class()
    with _atomic_path(out_path) as tmp:
        writer = Writer(str(tmp), fields, num_workers=workers, progress=progress, desc=desc, final=str(out_path))
        writer.from_indexed_dataset(dataset, chunksize=chunksize)
        # The record describes the finished temp file and is in place before the rename (bigexp.data.integrity).
        integrity.write_sidecar(out_path, integrity.describe(tmp, _reader(tmp, out_path), classes_path_for(out_path)))
    return out_path.stat().st_size


# ----------------------------------------------------------------------------------------------
# Checking an existing .beton
# ----------------------------------------------------------------------------------------------

def _reader(path: Path, shown: Optional[Path] = None):
    """ffcv's Reader of `path`, after integrity.check_header has bounded what it will allocate; DataError naming
    `shown` (default `path`) when it cannot read it."""
    from ffcv.reader import Reader

    shown = shown or path
    integrity.check_header(path, path.stat().st_size)
    try:
        return Reader(str(path))
    except Exception as exc:  # corrupt header, wrong version, truncated file ...
        raise DataError(f"{shown}: not a readable FFCV .beton file ({type(exc).__name__}: {exc})") from exc


def check_beton(path, *, full_hash: Optional[bool] = None, progress: bool = False) -> int:
    """Raise DataError naming `path` unless it is a complete .beton with exactly the fields image (RGBImageField)
    and label (IntField), matching what its writer recorded. Returns the number of samples.

    full_hash: also compare the sha256 (None: only for files up to integrity.FULL_HASH_ON_LOAD_MAX_BYTES, once
    per process). A file without a record (written before bigexp kept them) is checked for structure, with a
    warning once."""
    import_ffcv()
    from ffcv.fields import IntField, RGBImageField

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: .beton file not found{relative_path_note(path)}")
    info = integrity.read_sidecar(path)
    size = path.stat().st_size
    integrity.check_size(path, size, info)
    if info is not None and (full_hash or (full_hash is None and size <= integrity.FULL_HASH_ON_LOAD_MAX_BYTES)):
        integrity.check_hash(path, info, progress=progress)
    reader = _reader(path)
    want = {"image": RGBImageField, "label": IntField}
    got = integrity.field_types(reader)
    if list(reader.handlers) != list(EXPECTED_FIELDS) or not all(
            isinstance(reader.handlers[k], t) for k, t in want.items()):
        raise DataError(f"{path}: .beton has fields {got}; expected "
                        f"{{'image': 'RGBImageField', 'label': 'IntField'}} (write it with `bigexp data`)")
    if int(reader.num_samples) == 0:
        raise DataError(f"{path}: .beton holds no samples")
    integrity.check_structure(path, reader, info)
    integrity.check_classes(path, classes_path_for(path), reader.metadata["f1"], info)
    if info is None and full_hash is None:
        integrity.warn_unrecorded(path)
    return int(reader.num_samples)


def record_beton(path) -> Path:
    """Write the integrity record of an existing .beton that has none (from its bytes as they are now, after the
    structure check): `bigexp data verify --record`. Returns the sidecar's path."""
    path = Path(path)
    if integrity.read_sidecar(path) is not None:
        raise DataError(f"{path}: already has {integrity.sidecar_path_for(path).name}; not overwriting it")
    check_beton(path, full_hash=False)
    return integrity.write_sidecar(path, integrity.describe(path, _reader(path), classes_path_for(path)))
