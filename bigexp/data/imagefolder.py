"""ImageFolder trees (ImageNet layout, <root>/<wnid>/*.JPEG) to .beton: scan, find unreadable images, write."""
from __future__ import annotations

import multiprocessing as mp
import os
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from bigexp.data.beton import (WRITE_MODES, WriteResult, import_ffcv, relative_path_note, write_classes,
                               write_indexed_dataset)
from bigexp.errors import DataError

# Extensions torchvision's ImageFolder accepts; ImageNet itself is all .JPEG.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def scan_imagefolder(src_dir) -> tuple[list[str], list[tuple[str, int]]]:
    """(sorted class names, [(file path, class index)]) of an ImageFolder tree <src>/<class>/<img>.

    Sorted class-folder names give the standard ImageNet indices (sorted wnids). Raises DataError
    naming the path for a missing/non-directory source, a source without class folders, or a class
    folder without images.
    """
    src = Path(src_dir)
    if not src.exists():
        raise DataError(f"{src}: image directory does not exist{relative_path_note(src)}")
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
    from PIL import Image  # only where images are decoded: keeps `import bigexp.data` at numpy cost
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
    from tqdm import tqdm  # progress bars only when writing (keeps `import bigexp.data` cheap)
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

def _check_write_args(max_res, jpeg_quality, compress_probability, write_mode) -> None:
    if write_mode not in WRITE_MODES:
        raise ValueError(f"write_mode={write_mode!r}: expected one of {WRITE_MODES}")
    if not (1 <= int(jpeg_quality) <= 100):
        raise ValueError(f"jpeg_quality={jpeg_quality}: expected 1..100")
    if not (0.0 <= float(compress_probability) <= 1.0):
        raise ValueError(f"compress_probability={compress_probability}: expected 0..1")
    if int(max_res) <= 0:
        raise ValueError(f"max_res={max_res}: expected > 0")


def _drop_corrupt(src_dir, samples: list, bad: list, skip_corrupt: bool, progress: bool) -> list:
    """The samples without the unreadable ones; DataError listing them unless skip_corrupt."""
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
    return samples


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

    Also writes <out>.classes.json: {"source", "classes": [names], "class_to_idx": {name: index}}.
    """
    import_ffcv()
    from ffcv.fields import IntField, RGBImageField

    t0 = time.perf_counter()
    _check_write_args(max_res, jpeg_quality, compress_probability, write_mode)
    out_path = Path(out_path)
    classes, samples = scan_imagefolder(src_dir)
    workers = num_workers if num_workers and num_workers > 0 else (os.cpu_count() or 1)
    bad = find_corrupt([p for p, _ in samples], num_workers=workers, progress=progress)
    samples = _drop_corrupt(src_dir, samples, bad, skip_corrupt, progress)

    fields = {
        "image": RGBImageField(write_mode=write_mode, max_resolution=int(max_res),
                               jpeg_quality=int(jpeg_quality),
                               compress_probability=float(compress_probability)),
        "label": IntField(),
    }
    # Class list first: the .beton appearing under its final name is the "all done" signal.
    classes_path = write_classes(out_path, src_dir, classes)
    size = write_indexed_dataset(_ImageFolderSamples(samples), out_path, fields, num_workers=workers,
                                 progress=progress, desc=f"write {out_path.name}")
    return WriteResult(path=str(out_path), num_samples=len(samples), classes_path=str(classes_path),
                       num_skipped=len(bad), skipped=[p for p, _ in bad],
                       seconds=time.perf_counter() - t0, bytes=size)
