"""bigexp.data.fmnist: idx parsing and the RAW round trip through FFCV."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from bigexp.config.schema import DataConfig
from bigexp.data.fmnist import (FMNIST_MEAN, FMNIST_STD, load_split, read_idx, resize_gray,
                                write_fashion_mnist)
from bigexp.errors import DataError

from conftest import FMNIST_DIR as IDX
pytestmark = pytest.mark.skipif(not IDX.is_dir(), reason=f"{IDX} missing")


def raw_pixels(path) -> tuple[np.ndarray, np.ndarray]:
    """Every stored image (uint8 NHWC) and label of a .beton, undecorated: FFCV's plain decoder."""
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import ToTensor

    threads = torch.get_num_threads()
    loader = Loader(str(path), batch_size=1000, num_workers=1, order=OrderOption.SEQUENTIAL, drop_last=False,
                    pipelines={"image": [SimpleRGBImageDecoder()], "label": [IntDecoder()]})
    imgs, labs = [], []
    for x, y in loader:
        imgs.append(np.array(x))
        labs.append(np.array(y).reshape(-1))
    torch.set_num_threads(threads)
    return np.concatenate(imgs), np.concatenate(labs)


def test_read_idx_matches_format():
    images, labels = load_split(IDX, "test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and set(np.unique(labels)) == set(range(10))
    assert np.bincount(labels).tolist() == [1000] * 10  # Fashion-MNIST test split is balanced


def test_bad_idx_named(tmp_path):
    bad = tmp_path / "t10k-images-idx3-ubyte.gz"
    with gzip.open(bad, "wb") as fh:
        fh.write(b"\x00\x00\x08\x03" + np.array([5, 28, 28], ">u4").tobytes() + b"\x00" * 100)
    with pytest.raises(DataError, match=rf"{bad}: idx size mismatch"):
        read_idx(bad)
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte.gz: not found"):
        load_split(tmp_path, "test")
    with pytest.raises(DataError, match=str(tmp_path / "absent")):
        load_split(tmp_path / "absent", "test")


def test_round_trip_native_size_is_exact(tmp_path):
    """size=28, RAW storage: pixels (in all 3 channels) and labels equal the idx files' exactly,
    for the whole test split."""
    res = write_fashion_mnist(IDX, tmp_path, size=28, split="test", progress=False)
    assert Path(res.path) == tmp_path / "fmnist_test.beton" and res.num_samples == 10000
    images, labels = load_split(IDX, "test")
    got_x, got_y = raw_pixels(res.path)
    assert np.array_equal(got_y, labels)
    assert got_x.shape == (10000, 28, 28, 3)
    for c in range(3):
        assert np.array_equal(got_x[..., c], images)


def test_round_trip_resized_and_through_val_loader(tmp_path):
    """size=32: stored pixels equal resize_gray(idx) exactly, and the bigexp val loader's
    normalised batches invert (x * std + mean, rounded) back to those exact pixels."""
    n = 1000
    out = tmp_path / "sub.beton"
    write_fashion_mnist(IDX, out, size=32, split="train", limit=n, progress=False)
    images, labels = load_split(IDX, "train")
    want = resize_gray(images[:n], 32)
    got_x, got_y = raw_pixels(out)
    assert np.array_equal(got_y, labels[:n]) and np.array_equal(got_x[..., 1], want)

    from bigexp.data.loaders import build_val_loader
    cfg = DataConfig(dataset="fashion_mnist", val_beton=str(out), val_res=32, num_workers=1,
                     channels_last=False)
    vl = build_val_loader(cfg, batch_size=300, rank=0, world_size=1)
    xs, ys = zip(*vl)
    x, y = torch.cat(xs), torch.cat(ys)
    assert x.shape == (n, 3, 32, 32) and x.dtype == torch.float32 and x.is_contiguous()
    assert torch.equal(y, torch.from_numpy(labels[:n]))
    mean = torch.tensor(FMNIST_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(FMNIST_STD).view(1, 3, 1, 1) * 255
    back = (x.double() * std + mean).round().to(torch.uint8)
    assert torch.equal(back[:, 0], torch.from_numpy(want))
    # The hard-coded statistics fit: normalised pixels have mean ~0, std ~1.
    assert abs(x.mean().item()) < 0.05 and 0.85 < x.std().item() < 1.1


@pytest.mark.slow
def test_full_train_split_labels(tmp_path):
    """The writer handles the whole 60,000-image train file (~4 s); labels checked from the metadata."""
    from ffcv.reader import Reader
    res = write_fashion_mnist(IDX, tmp_path, size=32, split="train", progress=False)
    assert Path(res.path).name == "fmnist_train.beton" and res.num_samples == 60000
    meta = Reader(res.path).metadata
    _, labels = load_split(IDX, "train")
    assert np.array_equal(meta["f1"], labels)
    assert set(zip(meta["f0"]["width"], meta["f0"]["height"])) == {(32, 32)}
    assert set(meta["f0"]["mode"]) == {1}  # 1 = raw in FFCV's IMAGE_MODES
