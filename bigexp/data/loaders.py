"""FFCV train/val loaders with an epoch-explicit, resumable, rank-sharded order.

The sample order is computed here, not by FFCV's TraversalOrder: it is a pure function of
(seed, epoch, rank, world_size, batch size), which gives
  * exact mid-epoch resume: `iter_from(k)` feeds FFCV the remaining indices directly, no
    decoding of skipped batches;
  * sharding without torch.distributed being initialised (FFCV's distributed order builds a
    DistributedSampler, which needs an initialised process group).
The batches then go through FFCV's own EpochIterator, so decoding, JIT pipelines and
prefetching are FFCV's.

Augmentation is reproducible too: the train crop and flip come from `bigexp.data.augment`, whose
draws are a pure function of (seed, epoch, sample index) (FFCV's own crop/flip draw from numba's
per-thread generators and are not). So a resumed epoch decodes exactly the pixels an
uninterrupted one would.
"""
from __future__ import annotations

import math
import queue
from typing import Iterator, Optional

import numpy as np
import torch

from bigexp.data.beton import check_beton, import_ffcv
from bigexp.errors import DataError

# ImageNet channel statistics of pixels in [0, 1] (torchvision / FFCV recipes).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Centre-crop ratio of the standard ImageNet evaluation: resize 256 -> crop 224.
IMAGENET_CENTER_CROP_RATIO = 224 / 256
ORDERS = ("random", "quasi_random")


# ----------------------------------------------------------------------------------------------
# Pure functions: resolution schedule and sample order
# ----------------------------------------------------------------------------------------------

def resolution_for_epoch(epoch: int, min_res: int, max_res: int, start_ramp: int, end_ramp: int,
                         step: int = 32) -> int:
    """Progressive-resizing resolution (px) for `epoch` (0-based), FFCV's ResNet-50 recipe:
    min_res up to epoch start_ramp, max_res from epoch end_ramp on, linear in between rounded
    to the nearest multiple of `step` (e.g. 160 -> 192 px). The rounded value is clamped to
    [min_res, max_res] so small resolutions (Fashion-MNIST) never round to 0.
    """
    if min_res > max_res:
        raise ValueError(f"min_res={min_res} > max_res={max_res}")
    if start_ramp > end_ramp:
        raise ValueError(f"start_ramp={start_ramp} > end_ramp={end_ramp}")
    if epoch <= start_ramp:
        return int(min_res)
    if epoch >= end_ramp:
        return int(max_res)
    interp = np.interp(epoch, [start_ramp, end_ramp], [min_res, max_res])
    res = int(np.round(interp / step)) * step
    return int(min(max(res, min_res), max_res))


def _epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    # SeedSequence([seed, epoch]) keeps (seed, epoch) pairs apart; FFCV's seed + epoch would make
    # seed 0 / epoch 1 replay seed 1 / epoch 0.
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch)]))


def train_batches_per_epoch(num_samples: int, batch_size: int, world_size: int) -> int:
    """Full batches per rank per epoch (drop_last)."""
    return num_samples // (batch_size * world_size)


def train_epoch_indices(num_samples: int, *, seed: int, epoch: int, rank: int, world_size: int,
                        batch_size: int) -> np.ndarray:
    """This rank's sample indices for `epoch`, batch after batch (len = batches * batch_size).

    One permutation of all samples per (seed, epoch), shared by every rank; its first
    batches * batch_size * world_size entries are dealt out round-robin (rank r takes positions
    r, r + W, ...), so shards are disjoint and together cover the epoch; the tail that would not
    fill a batch on every rank is dropped (a different tail each epoch).
    """
    if not (0 <= rank < world_size):
        raise ValueError(f"rank={rank} outside [0, world_size={world_size})")
    perm = _epoch_rng(seed, epoch).permutation(num_samples).astype(np.uint64)
    per_rank = train_batches_per_epoch(num_samples, batch_size, world_size) * batch_size
    return perm[: per_rank * world_size][rank::world_size]


def val_indices(num_samples: int, *, rank: int, world_size: int) -> np.ndarray:
    """Sequential, round-robin shards; every sample exactly once over all ranks (no padding, so
    summed correct / summed count over ranks is the exact accuracy)."""
    if not (0 <= rank < world_size):
        raise ValueError(f"rank={rank} outside [0, world_size={world_size})")
    return np.arange(num_samples, dtype=np.uint64)[rank::world_size]


# ----------------------------------------------------------------------------------------------
# The FFCV-backed wrappers
# ----------------------------------------------------------------------------------------------

def _stats(cfg):
    if cfg.dataset == "fashion_mnist":
        from bigexp.data.fmnist import FMNIST_MEAN, FMNIST_STD
        return FMNIST_MEAN, FMNIST_STD
    return IMAGENET_MEAN, IMAGENET_STD


def _crop_ratio(cfg) -> float:
    # Fashion-MNIST is stored at its training size already: a centre crop would only cut borders.
    return IMAGENET_CENTER_CROP_RATIO if cfg.dataset == "imagenet" else 1.0


def _resolve_device(device) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={device!r} requested but CUDA is not available")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device={device!r}: expected cpu or cuda")
    return dev


def _numba_workers(n: int) -> int:
    # numba refuses set_num_threads(n) above NUMBA_NUM_THREADS (the core count by default).
    import numba
    return max(1, min(int(n), int(numba.config.NUMBA_NUM_THREADS)))


class _FFCVBatches:
    """Shared machinery: an FFCV Loader used only for its compiled pipeline, fed our orders."""

    def __init__(self, path, *, decoder, batch_size: int, num_workers: int, os_cache: bool,
                 dtype: torch.dtype, device, mean, std, channels_last: bool, batches_ahead: int,
                 order: str = "random", seed: int = 0):
        import_ffcv()
        from ffcv.fields.basics import IntDecoder
        from ffcv.loader import Loader, OrderOption
        from ffcv.transforms import NormalizeImage, ToDevice, ToTensor, ToTorchImage

        if batch_size <= 0:
            raise ValueError(f"batch_size={batch_size}: expected > 0")
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype={dtype}: expected torch.float32, torch.bfloat16 or torch.float16")
        self.path = str(path)
        self.num_samples = check_beton(path)
        self.batch_size = int(batch_size)
        self.num_workers = _numba_workers(num_workers)
        self.dtype = dtype
        self.device = _resolve_device(device)
        self.channels_last = channels_last
        self._decoder = decoder
        self._gpu = self.device.type == "cuda"

        image_pipe = [decoder]  # a train decoder flips by itself (bigexp.data.augment)
        if self._gpu:
            # FFCV's GPU order: move uint8 (4x less PCIe traffic), then permute on the device.
            # FFCV's GPU NormalizeImage needs cupy; normalising in torch on the device instead.
            image_pipe += [ToTensor(), ToDevice(self.device, non_blocking=True),
                           ToTorchImage(channels_last=channels_last)]
            self._mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1) * 255
            self._std = torch.tensor(std, device=self.device).view(1, 3, 1, 1) * 255
        else:
            # On CPU NormalizeImage must come BEFORE ToTensor (the other order hangs, ffcv #396).
            image_pipe += [NormalizeImage(np.array(mean) * 255, np.array(std) * 255, np.float32),
                           ToTensor(), ToTorchImage(channels_last=channels_last)]
        label_pipe = [IntDecoder(), ToTensor()]
        if self._gpu:
            label_pipe.append(ToDevice(self.device, non_blocking=True))

        ffcv_order = {"random": OrderOption.SEQUENTIAL, "quasi_random": OrderOption.QUASI_RANDOM}[order]
        threads = torch.get_num_threads()
        try:
            self._loader = Loader(self.path, batch_size=self.batch_size, num_workers=self.num_workers,
                                  os_cache=os_cache, order=ffcv_order, distributed=False, seed=int(seed),
                                  pipelines={"image": image_pipe, "label": label_pipe},
                                  drop_last=False, batches_ahead=batches_ahead)
        finally:
            torch.set_num_threads(threads)  # ffcv's Compiler.set_num_threads changes torch's count

    def _finish(self, images: torch.Tensor, labels: torch.Tensor):
        # Copies, because FFCV reuses its output buffers for later batches.
        if self._gpu:
            images = ((images.float() - self._mean) / self._std).to(self.dtype)
        else:
            images = images.to(self.dtype, copy=True)
        return images, labels.reshape(-1).to(torch.int64, copy=True)

    def _iterate(self, order: np.ndarray, aug_key: Optional[int] = None
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from ffcv.pipeline.compiler import Compiler

        from bigexp.data.augment import seeded_epoch_iterator

        if len(order) == 0:
            return
        threads = torch.get_num_threads()
        try:
            Compiler.set_num_threads(self.num_workers)
            it = seeded_epoch_iterator(self._loader, np.ascontiguousarray(order, dtype=np.uint64), aug_key)
        finally:
            torch.set_num_threads(threads)
        try:
            for images, labels in it:
                yield self._finish(images, labels)
        finally:
            _stop(it)
            torch.set_num_threads(threads)


def _stop(it) -> None:
    """Stop an EpochIterator early without leaving its thread running or blocked.

    Its thread checks the terminate flag only when the output queue is full and ends with a
    blocking put(None); so: no more batches to start, keep the queue drained until the thread has
    exited, then release the memory context (it must not go while the thread still reads it).
    """
    if not it.is_alive():
        it.close()
        return
    it.iter_ixes = iter(())
    it.terminate_event.set()
    while it.is_alive():
        try:
            while True:
                it.output_queue.get_nowait()
        except queue.Empty:
            pass
        it.join(timeout=0.05)
    it.close()


class TrainLoader(_FFCVBatches):
    """Training batches of one rank: (images [B, 3, res, res] `dtype`, labels int64 [B]).

    Call `set_epoch(e)` before iterating epoch e (default 0); the order depends only on
    (seed, epoch, rank, world_size, batch_size), and `resolution` follows the progressive-resizing
    schedule of the config.
    """

    def __init__(self, cfg, *, batch_size: int, rank: int, world_size: int, seed: int,
                 dtype=torch.float32, device="cpu", order: str = "random", batches_ahead: int = 3):
        import_ffcv()
        from ffcv.fields.rgb_image import CenterCropRGBImageDecoder

        from bigexp.data.augment import seeded_crop_flip_decoder

        if order not in ORDERS:
            raise ValueError(f"order={order!r}: expected one of {ORDERS}")
        if order == "quasi_random" and world_size > 1:
            raise ValueError("order='quasi_random' cannot be sharded across ranks "
                             f"(world_size={world_size}; FFCV's QuasiRandom refuses distributed=True): "
                             "use order='random'")
        if not (0 <= rank < world_size):
            raise ValueError(f"rank={rank} outside [0, world_size={world_size})")
        self.cfg = cfg
        self.rank, self.world_size, self.seed = int(rank), int(world_size), int(seed)
        self.order = order
        self.epoch = 0
        self.resolution = resolution_for_epoch(0, cfg.min_res, cfg.max_res, cfg.start_ramp_epoch,
                                               cfg.end_ramp_epoch, cfg.res_step)
        size = (self.resolution, self.resolution)
        if cfg.random_crop:
            # crop AND flip, reproducible per (seed, epoch, sample)
            decoder = seeded_crop_flip_decoder(size, scale=(cfg.crop_scale_min, 1.0))
        else:
            decoder = CenterCropRGBImageDecoder(size, ratio=_crop_ratio(cfg))
        mean, std = _stats(cfg)
        super().__init__(cfg.train_beton, decoder=decoder, batch_size=batch_size,
                         num_workers=cfg.num_workers, os_cache=cfg.os_cache, dtype=dtype, device=device,
                         mean=mean, std=std, channels_last=bool(cfg.channels_last), batches_ahead=batches_ahead,
                         order=order, seed=seed)
        if len(self) == 0:
            raise DataError(f"{cfg.train_beton}: {self.num_samples} samples cannot fill one batch of "
                            f"{batch_size} per rank on {world_size} rank(s)")

    def set_epoch(self, epoch: int) -> None:
        """Select epoch `epoch` (0-based) for the next iteration: its order and resolution."""
        if epoch < 0:
            raise ValueError(f"epoch={epoch}: expected >= 0")
        self.epoch = int(epoch)
        self.resolution = resolution_for_epoch(self.epoch, self.cfg.min_res, self.cfg.max_res,
                                               self.cfg.start_ramp_epoch, self.cfg.end_ramp_epoch,
                                               self.cfg.res_step)
        # Buffers are sized from output_size when each epoch's iterator allocates them, so changing
        # it between epochs needs no recompilation (as in FFCV's ImageNet example).
        self._decoder.output_size = (self.resolution, self.resolution)

    def indices(self, epoch: Optional[int] = None) -> np.ndarray:
        """Sample indices this rank visits in `epoch` (default: the current one), in batch order."""
        e = self.epoch if epoch is None else int(epoch)
        if self.order == "quasi_random":
            order = np.asarray(self._loader.traversal_order.sample_order(e), dtype=np.uint64)
            return order[: len(self) * self.batch_size]
        return train_epoch_indices(self.num_samples, seed=self.seed, epoch=e, rank=self.rank,
                                   world_size=self.world_size, batch_size=self.batch_size)

    def __len__(self) -> int:
        return train_batches_per_epoch(self.num_samples, self.batch_size, self.world_size)

    def __iter__(self):
        return self.iter_from(0)

    def iter_from(self, batch_index: int):
        """The batches batch_index, batch_index + 1, ... of the current epoch: the same samples in
        the same batches as an uninterrupted pass would give (no decoding of skipped batches)."""
        if not (0 <= batch_index <= len(self)):
            raise ValueError(f"batch_index={batch_index} outside [0, {len(self)}]")
        from bigexp.data.augment import epoch_key

        key = epoch_key(self.seed, self.epoch) if self.cfg.random_crop else None
        return self._iterate(self.indices()[batch_index * self.batch_size:], aug_key=key)


class ValLoader(_FFCVBatches):
    """Validation batches of one rank: centre crop at cfg.val_res, fixed order, no dropped samples."""

    def __init__(self, cfg, *, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 dtype=torch.float32, device="cpu", batches_ahead: int = 3):
        import_ffcv()
        from ffcv.fields.rgb_image import CenterCropRGBImageDecoder

        if not (0 <= rank < world_size):
            raise ValueError(f"rank={rank} outside [0, world_size={world_size})")
        self.cfg = cfg
        self.rank, self.world_size = int(rank), int(world_size)
        self.epoch = 0
        self.resolution = int(cfg.val_res)
        decoder = CenterCropRGBImageDecoder((self.resolution, self.resolution), ratio=_crop_ratio(cfg))
        mean, std = _stats(cfg)
        super().__init__(cfg.val_beton, decoder=decoder, batch_size=batch_size,
                         num_workers=cfg.num_workers, os_cache=cfg.os_cache, dtype=dtype, device=device,
                         mean=mean, std=std, channels_last=bool(cfg.channels_last), batches_ahead=batches_ahead,
                         seed=seed)

    def set_epoch(self, epoch: int) -> None:
        """Validation order does not depend on the epoch; kept for a uniform interface."""
        self.epoch = int(epoch)

    def indices(self, epoch: Optional[int] = None) -> np.ndarray:
        return val_indices(self.num_samples, rank=self.rank, world_size=self.world_size)

    def __len__(self) -> int:
        return math.ceil(len(self.indices()) / self.batch_size)

    def __iter__(self):
        return self.iter_from(0)

    def iter_from(self, batch_index: int):
        if not (0 <= batch_index <= len(self)):
            raise ValueError(f"batch_index={batch_index} outside [0, {len(self)}]")
        return self._iterate(self.indices()[batch_index * self.batch_size:])


def build_train_loader(cfg, *, batch_size: int, rank: int, world_size: int, seed: int,
                       dtype=torch.float32, device="cpu", order: str = "random",
                       batches_ahead: int = 3) -> TrainLoader:
    """Training loader for one rank. batch_size is per rank (cfg.batch_size is global)."""
    return TrainLoader(cfg, batch_size=batch_size, rank=rank, world_size=world_size, seed=seed,
                       dtype=dtype, device=device, order=order, batches_ahead=batches_ahead)


def build_val_loader(cfg, *, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                     dtype=torch.float32, device="cpu", batches_ahead: int = 3) -> ValLoader:
    """Validation loader for one rank (its round-robin shard; all ranks together: every sample once)."""
    return ValLoader(cfg, batch_size=batch_size, rank=rank, world_size=world_size, seed=seed,
                     dtype=dtype, device=device, batches_ahead=batches_ahead)
