"""bigexp.data.augment: crop and flip draws are a pure function of (seed, epoch, sample index), inside FFCV's real
compiled pipeline, so exact mid-epoch resume holds with augmentation on."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bigexp.data.augment import crop_params, epoch_key, splitmix64
from conftest import fmnist_betons


def test_splitmix64_matches_the_reference_sequence():
    # Vigna's splitmix64.c seeded with 0: state += golden gamma, then this output function.
    assert splitmix64(0) == 0xE220A8397B1DCDAF
    assert splitmix64(0x9E3779B97F4A7C15) == 0x6E789E6AA1B965F4


def test_epoch_keys_are_distinct_and_not_seed_plus_epoch():
    keys = {epoch_key(s, e) for s in range(20) for e in range(20)}
    assert len(keys) == 400
    assert epoch_key(0, 1) != epoch_key(1, 0)


def test_crop_params_distribution_and_determinism():
    """torchvision's RandomResizedCrop distribution: area fraction ~ U(0.08, 1) where it fits, flip p = 1/2."""
    draws = [crop_params(7, 3, s, 64, 48) for s in range(4000)]
    assert draws == [crop_params(7, 3, s, 64, 48) for s in range(4000)]
    assert draws != [crop_params(7, 4, s, 64, 48) for s in range(4000)]
    flips = sum(d[4] for d in draws) / len(draws)
    assert abs(flips - 0.5) < 4 * math.sqrt(0.25 / len(draws))   # 4 sigma
    for i, j, h, w, _ in draws:
        assert 0 <= i and i + h <= 64 and 0 <= j and j + w <= 48 and h > 0 and w > 0
    areas = np.array([h * w / (64 * 48) for _, _, h, w, _ in draws])
    assert areas.min() >= 0.07 and areas.max() <= 1.0
    assert 0.4 < np.median(areas) < 0.65   # U(0.08, 1) has median 0.54 (rounding and the fit test shift it a bit)


@pytest.fixture(scope="module")
def beton(tmp_path_factory):
    return fmnist_betons(tmp_path_factory.mktemp("aug"), train=128) / "train.beton"


def _loader(beton, batch_size, world_size=1, workers=2):
    from bigexp.config import load_config
    from bigexp.data.loaders import build_train_loader

    cfg = load_config(None, [f"data.train_beton={beton}", f"data.num_workers={workers}", "data.random_crop=true",
                             "data.channels_last=false"]).data
    return build_train_loader(cfg, batch_size=batch_size, rank=0, world_size=world_size, seed=3)


@pytest.mark.slow
def test_pipeline_pixels_depend_only_on_seed_epoch_and_sample(beton):
    from bigexp.data.fmnist import FMNIST_MEAN, FMNIST_STD
    from ffcv.libffcv import resize_crop
    from ffcv.reader import Reader

    a = _loader(beton, 16)
    a.set_epoch(1)
    full = [x.clone() for x, _ in a]
    # resume mid-epoch: the same pixels, no matter how many batches were skipped
    tail = [x.clone() for x, _ in a.iter_from(5)]
    assert all(torch.equal(p, q) for p, q in zip(full[5:], tail)) and len(tail) == len(full) - 5
    # another batch size, one decoding thread: every sample still decodes to the same pixels
    b = _loader(beton, 8, workers=1)
    b.set_epoch(1)
    where = {int(s): k for k, s in enumerate(b.indices())}
    flat_b = torch.cat([x.clone() for x, _ in b])
    flat_a = torch.cat(full)
    for k, s in enumerate(a.indices()):
        assert torch.equal(flat_a[k], flat_b[where[int(s)]])
    # another epoch: other crops
    a.set_epoch(2)
    assert not torch.equal(next(iter(a))[0], full[0])
    # and the pixels are the documented crop + resize + flip of the stored image
    reader = Reader(str(beton))
    meta = reader.metadata["f0"]
    mean = np.array(FMNIST_MEAN) * 255
    std = np.array(FMNIST_STD) * 255
    for k in range(4):
        s = int(a.indices(1)[k])
        h0, w0 = int(meta[s]["height"]), int(meta[s]["width"])
        assert int(meta[s]["mode"]) == 1  # raw pixels (Fashion-MNIST is written uncompressed)
        raw = np.fromfile(str(beton), dtype=np.uint8, count=h0 * w0 * 3,
                          offset=int(meta[s]["data_ptr"])).reshape(h0, w0, 3)
        i, j, h, w, flip = crop_params(3, 1, s, h0, w0)
        want = np.zeros((32, 32, 3), np.uint8)
        resize_crop(raw, i, i + h, j, j + w, want)
        if flip:
            want = want[:, ::-1]
        want = torch.from_numpy(((want - mean) / std).astype(np.float32)).permute(2, 0, 1)
        assert torch.allclose(flat_a[k], want, atol=1e-5), k
