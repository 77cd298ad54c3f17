"""bigexp.data.loaders on a real .beton of 1,000 ImageNet val JPEGs (one per class).

One image per class and sorted wnids make the label of a sample equal to its index in the file,
so labels identify samples: the order a loader produced is just its label sequence.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bigexp.config.schema import DataConfig
from bigexp.data.loaders import (build_train_loader, build_val_loader, resolution_for_epoch,
                                 train_epoch_indices, val_indices)
from bigexp.data.imagefolder import write_imagefolder

from conftest import IMAGENET_SAMPLE as SAMPLE
pytestmark = pytest.mark.skipif(not SAMPLE.is_dir(), reason=f"{SAMPLE} missing")
N = 1000


@pytest.fixture(scope="module")
def beton(tmp_path_factory):
    out = tmp_path_factory.mktemp("imagenet") / "val160.beton"
    res = write_imagefolder(SAMPLE, out, max_res=160, progress=False)
    assert res.num_samples == N
    return res


def cfg_for(beton, **kw) -> DataConfig:
    base = dict(dataset="imagenet", train_beton=beton.path, val_beton=beton.path, num_workers=2,
                min_res=64, max_res=96, start_ramp_epoch=1, end_ramp_epoch=3, val_res=64,
                channels_last=True)  # the GPU layout (the CPU default is NCHW): the harder path of the pipeline
    base.update(kw)
    return DataConfig(**base)


@pytest.fixture(scope="module")
def train(beton):
    return build_train_loader(cfg_for(beton), batch_size=100, rank=0, world_size=1, seed=0)


def epoch_labels(loader, epoch) -> np.ndarray:
    loader.set_epoch(epoch)
    return torch.cat([y for _, y in loader]).numpy()


# ------------------------------------------------------------------------------------ pure functions

def test_resolution_schedule_ffcv_recipe():
    # FFCV's ResNet-50 recipe: 160 px until epoch 65 (of 88), 192 px from epoch 76, multiples of 32.
    res = [resolution_for_epoch(e, 160, 192, 65, 76) for e in range(88)]
    assert res[:66] == [160] * 66 and res[76:] == [192] * 12
    assert set(res) == {160, 192} and res == sorted(res)
    assert resolution_for_epoch(71, 160, 192, 65, 76) == 192  # 160 + 32*6/11 = 177.5 -> 192
    # small images: the 32-px rounding is clamped into [min_res, max_res], never 0 (here 12 and
    # 14 px round to 0 -> min_res; max_res arrives at end_ramp)
    assert [resolution_for_epoch(e, 8, 16, 0, 4) for e in range(5)] == [8, 8, 8, 8, 16]
    assert [resolution_for_epoch(e, 8, 16, 0, 4, step=4) for e in range(5)] == [8, 8, 12, 16, 16]
    with pytest.raises(ValueError, match="min_res"):
        resolution_for_epoch(0, 64, 32, 0, 1)


def test_index_functions_shard_and_cover():
    for ws, bs in [(1, 7), (2, 50), (3, 64), (4, 1)]:
        shards = [train_epoch_indices(N, seed=3, epoch=5, rank=r, world_size=ws, batch_size=bs) for r in range(ws)]
        allidx = np.concatenate(shards)
        per = N // (ws * bs) * bs
        assert all(len(s) == per for s in shards)
        assert len(np.unique(allidx)) == len(allidx) == per * ws  # disjoint
        v = np.concatenate([val_indices(N, rank=r, world_size=ws) for r in range(ws)])
        assert sorted(v.tolist()) == list(range(N))  # val: every sample exactly once
    a = train_epoch_indices(N, seed=0, epoch=1, rank=0, world_size=1, batch_size=10)
    b = train_epoch_indices(N, seed=1, epoch=0, rank=0, world_size=1, batch_size=10)
    assert not np.array_equal(a, b)  # (seed, epoch) pairs do not alias as seed + epoch would


# ------------------------------------------------------------------------------------ real loader

def test_classes_and_every_label_once(beton):
    classes = json.loads(Path(beton.classes_path).read_text())["classes"]
    assert len(classes) == N and classes == sorted(p.name for p in SAMPLE.iterdir())
    assert all(c.startswith("n") and len(c) == 9 for c in classes)
    vl = build_val_loader(cfg_for(beton), batch_size=128, rank=0, world_size=1, dtype=torch.bfloat16)
    assert len(vl) == 8 and vl.resolution == 64
    xs, ys = zip(*vl)
    assert torch.equal(torch.cat(ys), torch.arange(N))
    assert xs[0].shape == (128, 3, 64, 64) and xs[-1].shape == (N - 7 * 128, 3, 64, 64)
    assert xs[0].dtype == torch.bfloat16 and xs[0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.slow  # the first train loader pays FFCV's JIT compile (~10-20 s)
def test_train_batches_shapes_stats_threads(train):
    torch.set_num_threads(1)  # the caller's count must survive FFCV (it sets its own)
    train.set_epoch(0)
    assert len(train) == 10 and train.resolution == 64
    n_seen, sums, sqs = 0, 0.0, 0.0
    for i, (x, y) in enumerate(train):
        assert torch.get_num_threads() == 1
        assert x.shape == (100, 3, 64, 64) and x.dtype == torch.float32
        assert x.is_contiguous(memory_format=torch.channels_last)
        assert y.shape == (100,) and y.dtype == torch.int64
        if i < 4:
            sums = sums + x.double().sum((0, 2, 3))
            sqs = sqs + (x.double() ** 2).sum((0, 2, 3))
            n_seen += x.shape[0] * 64 * 64
    assert torch.get_num_threads() == 1
    mean = sums / n_seen
    std = (sqs / n_seen - mean ** 2).sqrt()
    # ImageNet normalisation over 400 random crops: per-channel mean ~0 and std ~1 (crops of
    # 400 photos are not the full-dataset statistics, hence the loose band).
    assert mean.abs().max() < 0.25, mean
    assert ((std > 0.8) & (std < 1.3)).all(), std


def test_order_is_a_function_of_seed_and_epoch(train, beton):
    e0 = epoch_labels(train, 0)
    assert sorted(e0.tolist()) == list(range(N))  # 1000 / 100: every sample once
    np.testing.assert_array_equal(e0, train.indices(0))  # the loader visits exactly indices()
    e1 = epoch_labels(train, 1)
    assert not np.array_equal(e0, e1)  # a new shuffle each epoch
    np.testing.assert_array_equal(epoch_labels(train, 0), e0)  # explicit epoch: replayable
    other = build_train_loader(cfg_for(beton, random_crop=False), batch_size=100, rank=0, world_size=1, seed=1)
    assert not np.array_equal(epoch_labels(other, 0), e0)  # another seed, another order


def test_progressive_resizing_per_epoch(train):
    shapes = {}
    for e in (0, 2, 3, 7):
        train.set_epoch(e)
        x, _ = next(iter(train))
        shapes[e] = (train.resolution, tuple(x.shape[-2:]))
    # epoch 2 sits mid-ramp: 64 + 16 = 80 px rounds to 64 (nearest multiple of 32)
    assert shapes == {0: (64, (64, 64)), 2: (64, (64, 64)), 3: (96, (96, 96)), 7: (96, (96, 96))}


def test_iter_from_equals_tail_of_uninterrupted_epoch(beton):
    """Centre crop, no flip: deterministic pixels, so batches can be compared exactly."""
    cfg = cfg_for(beton, random_crop=False, min_res=48, max_res=48, num_workers=1)
    tl = build_train_loader(cfg, batch_size=64, rank=0, world_size=1, seed=7)
    assert len(tl) == 15  # 1000 // 64, drop_last
    tl.set_epoch(4)
    full = list(tl)
    assert len(full) == 15
    for k in (0, 6, 14, 15):
        tail = list(tl.iter_from(k))
        assert len(tail) == 15 - k
        for (xa, ya), (xb, yb) in zip(full[k:], tail):
            assert torch.equal(ya, yb) and torch.equal(xa, xb)
    # an abandoned iteration does not disturb the next one (buffers, threads)
    it = iter(tl)
    next(it)
    del it
    assert torch.equal(torch.cat([y for _, y in tl.iter_from(10)]), torch.cat([y for _, y in full[10:]]))
    with pytest.raises(ValueError, match="batch_index"):
        tl.iter_from(16)


def test_refusals(beton):
    with pytest.raises(ValueError, match="quasi_random.*world_size=2"):
        build_train_loader(cfg_for(beton), batch_size=10, rank=0, world_size=2, seed=0, order="quasi_random")
    with pytest.raises(ValueError, match="rank=2"):
        build_train_loader(cfg_for(beton), batch_size=10, rank=2, world_size=2, seed=0)
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        if torch.cuda.is_available():
            pytest.skip("CUDA present")
        build_train_loader(cfg_for(beton), batch_size=10, rank=0, world_size=1, seed=0, device="cuda")
