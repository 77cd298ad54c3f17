"""Fashion-MNIST from its idx files (Debian's dataset-fashion-mnist) to FFCV .beton.

Images are grayscale 28x28; they are stored as 3 identical RGB channels (the image pipeline is
RGB throughout) and RAW (no JPEG), so what the loader reads back is bit-exact.
"""
from __future__ import annotations

import gzip
import time
from pathlib import Path
from typing import Optional

import numpy as np

from bigexp.data.beton import WriteResult, import_ffcv, relative_path_note, write_classes, write_indexed_dataset
from bigexp.errors import DataError

DEFAULT_IDX_DIR = "/usr/share/datasets/fashion-mnist"
SPLIT_PREFIX = {"train": "train", "test": "t10k"}
DEFAULT_NAMES = {"train": "fmnist_train.beton", "test": "fmnist_test.beton"}
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]

# Pixel mean/std (in [0, 1]) of the 60,000 native 28x28 training images, computed with
#   x = read_idx(train-images-idx3-ubyte.gz) / 255; x.mean(), x.std()  ->  0.28604, 0.35302
# Used for every resolution: the bilinear 28->32 upsample shifts them only to 0.2852 / 0.3382,
# so normalised batches still have mean ~0 and std ~0.96 - not worth a per-size table.
FMNIST_MEAN = (0.2860, 0.2860, 0.2860)
FMNIST_STD = (0.3530, 0.3530, 0.3530)

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path) -> np.ndarray:
    """Parse an idx file (optionally .gz): magic 0x0000 <dtype byte> <ndim byte>, then ndim
    big-endian uint32 sizes, then the data. Raises DataError naming the path if malformed."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: idx file not found{relative_path_note(path)}")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path}: not an idx file (bad magic {raw[:4].hex()})")
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise DataError(f"{path}: idx size mismatch: header says shape {shape} "
                        f"({expected} bytes) but the file has {len(raw)}")
    return np.frombuffer(raw, dtype, offset=header).reshape(shape)


def idx_paths(idx_dir, split: str) -> tuple[Path, Path]:
    if split not in SPLIT_PREFIX:
        raise ValueError(f"split={split!r}: expected 'train' or 'test'")
    d = Path(idx_dir)
    if not d.is_dir():
        raise DataError(f"{d}: Fashion-MNIST idx directory does not exist{relative_path_note(d)}")
    p = SPLIT_PREFIX[split]
    out = []
    for kind in ("images-idx3", "labels-idx1"):
        cands = [d / f"{p}-{kind}-ubyte.gz", d / f"{p}-{kind}-ubyte"]
        found = next((c for c in cands if c.is_file()), None)
        if found is None:
            raise DataError(f"{cands[0]}: not found (nor uncompressed) in Fashion-MNIST directory {d}")
        out.append(found)
    return out[0], out[1]


def load_split(idx_dir, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28], labels int64 [N]) of one split."""
    img_path, lab_path = idx_paths(idx_dir, split)
    images = read_idx(img_path)
    labels = read_idx(lab_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(f"{img_path}: expected uint8 images [N, H, W], got {images.dtype} {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError(f"{lab_path}: {labels.shape} labels for {len(images)} images in {img_path}")
    return images, labels.astype(np.int64)


def resize_gray(images: np.ndarray, size: int) -> np.ndarray:
    """[N, H, W] uint8 -> [N, size, size] uint8. Bilinear when enlarging, area when shrinking;
    unchanged (same array) when size equals the native size."""
    import cv2  # OpenCV only when resizing (~0.3 s to import)
    n, h, w = images.shape
    if (h, w) == (size, size):
        return images
    interp = cv2.INTER_LINEAR if size > max(h, w) else cv2.INTER_AREA
    out = np.empty((n, size, size), np.uint8)
    for i in range(n):
        out[i] = cv2.resize(images[i], (size, size), interpolation=interp)
    return out


class _GrayAsRGB:
    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        g = self.images[i]
        return np.ascontiguousarray(np.repeat(g[:, :, None], 3, axis=2)), int(self.labels[i])


def write_fashion_mnist(idx_dir, out_dir_or_path, *, size: int = 32, split: str = "train",
                        limit: Optional[int] = None, num_workers: Optional[int] = None,
                        progress: bool = True) -> WriteResult:
    """Write one Fashion-MNIST split to a RAW-stored .beton.

    idx_dir: directory with {train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz].
    out_dir_or_path: a path ending in .beton, or a directory (then fmnist_train.beton /
      fmnist_test.beton inside it).
    size: output side in px (> 0); 28 keeps the native images untouched.
    split: "train" (60,000) or "test" (10,000).
    limit: write only the first `limit` samples (tests).
    """
    import_ffcv()
    from ffcv.fields import IntField, RGBImageField

    t0 = time.perf_counter()
    if int(size) <= 0:
        raise ValueError(f"size={size}: expected > 0")
    out = Path(out_dir_or_path)
    if out.suffix != ".beton":
        out = out / DEFAULT_NAMES[split] if split in DEFAULT_NAMES else out
    images, labels = load_split(idx_dir, split)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    images = resize_gray(images, int(size))
    fields = {"image": RGBImageField(write_mode="raw"), "label": IntField()}
    classes_path = write_classes(out, idx_dir, CLASSES)
    nbytes = write_indexed_dataset(_GrayAsRGB(images, labels), out, fields, num_workers=num_workers,
                                   progress=progress, desc=f"write {out.name}", chunksize=1000)
    return WriteResult(path=str(out), num_samples=len(labels), classes_path=str(classes_path),
                       seconds=time.perf_counter() - t0, bytes=nbytes)
