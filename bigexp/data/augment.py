"""Reproducible train augmentation for FFCV: random-resized crop + horizontal flip whose draws are a pure function
of (seed, epoch, sample index).

Why: FFCV's RandomResizedCropRGBImageDecoder and RandomHorizontalFlip draw from numba's per-thread generators, so a
run resumed mid-epoch (or the same run twice) sees different crops. Here every draw is a counter-based hash
(splitmix64) of a per-epoch key and the sample index, so it does not depend on the thread, the batch the sample lands
in, or how many batches came before it (`iter_from(k)` decodes exactly what an uninterrupted pass decodes).

How the epoch reaches the compiled code: numba freezes closure variables at compile time and FFCV compiles the
pipeline once per Loader, so the per-epoch key travels as DATA: the decoder asks FFCV for one extra uint64 buffer
next to its image buffers, and `SeededEpochIterator` writes the key into it before its worker thread starts. The
distributions are torchvision's / FFCV's: area fraction uniform in `scale`, log aspect ratio uniform in log `ratio`,
10 tries, then the centre-crop fallback; flip with probability 1/2.
"""
from __future__ import annotations

import numpy as np

from bigexp.data.beton import import_ffcv

_GOLDEN = 0x9E3779B97F4A7C15
_MASK64 = (1 << 64) - 1
# Draw slots per sample: 10 crop tries x 4 uniforms, then the flip.
_FLIP_SLOT = 40


def splitmix64(x: int) -> int:
    """splitmix64's output function (Steele, Lea & Flood 2014) on a Python int; the numba twin is `_mix`."""
    z = (x + _GOLDEN) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def epoch_key(seed: int, epoch: int) -> int:
    """The 64-bit key of one epoch's augmentation draws (seed >= 0, epoch >= 0)."""
    return splitmix64(splitmix64(int(seed) & _MASK64) ^ (int(epoch) & _MASK64))


def _numba_kernels():
    """numba versions of the pure functions (compiled lazily: importing this module needs no numba)."""
    from numba import njit

    @njit(inline="always")
    def _mix(x):
        z = x + np.uint64(_GOLDEN)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))

    @njit(inline="always")
    def uniform(key, sample, slot):
        """U[0, 1) with 53 random bits, a pure function of (key, sample index, slot)."""
        z = _mix(key ^ _mix(np.uint64(sample) * np.uint64(64) + np.uint64(slot)))
        return np.float64(z >> np.uint64(11)) * (1.0 / 9007199254740992.0)

    @njit
    def crop_and_flip(key, sample, height, width, scale0, scale1, log_r0, log_r1):
        """(i, j, h, w, flip) for one sample: torchvision's RandomResizedCrop.get_params with our draws."""
        area = float(height) * float(width)
        flip = uniform(key, sample, _FLIP_SLOT) < 0.5
        for t in range(10):
            target = area * (scale0 + (scale1 - scale0) * uniform(key, sample, 4 * t))
            aspect = np.exp(log_r0 + (log_r1 - log_r0) * uniform(key, sample, 4 * t + 1))
            w = int(round(np.sqrt(target * aspect)))
            h = int(round(np.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                i = int(uniform(key, sample, 4 * t + 2) * (height - h + 1))
                j = int(uniform(key, sample, 4 * t + 3) * (width - w + 1))
                return i, j, h, w, flip
        in_ratio = float(width) / float(height)
        r0, r1 = np.exp(log_r0), np.exp(log_r1)
        if in_ratio < r0:
            w = width
            h = int(round(w / r0))
        elif in_ratio > r1:
            h = height
            w = int(round(h * r1))
        else:
            w = width
            h = height
        return (height - h) // 2, (width - w) // 2, h, w, flip

    return uniform, crop_and_flip


_KERNELS = None


def kernels():
    """(uniform(key, sample, slot), crop_and_flip(key, sample, height, width, scale0, scale1, log_r0, log_r1))."""
    global _KERNELS
    if _KERNELS is None:
        _KERNELS = _numba_kernels()
    return _KERNELS


def crop_params(seed: int, epoch: int, sample: int, height: int, width: int, scale=(0.08, 1.0),
                ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int, bool]:
    """(top, left, crop height, crop width, flipped) that the seeded decoder uses for `sample` in `epoch`."""
    _, crop_and_flip = kernels()
    i, j, h, w, flip = crop_and_flip(np.uint64(epoch_key(seed, epoch)), np.uint64(sample), int(height), int(width),
                                     float(scale[0]), float(scale[1]), float(np.log(ratio[0])),
                                     float(np.log(ratio[1])))
    return int(i), int(j), int(h), int(w), bool(flip)


def _decoder_class():
    import_ffcv()
    from ffcv.fields.rgb_image import IMAGE_MODES, RandomResizedCropRGBImageDecoder
    from ffcv.libffcv import imdecode, resize_crop
    from ffcv.pipeline.allocation_query import AllocationQuery
    from ffcv.pipeline.compiler import Compiler

    class SeededRandomResizedCropFlipDecoder(RandomResizedCropRGBImageDecoder):
        """RandomResizedCropRGBImageDecoder + horizontal flip (p = 1/2), both drawn from
        hash(epoch_key(seed, epoch), sample index). Set the key through `SeededEpochIterator`."""

        def __init__(self, output_size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
            super().__init__(output_size, scale=scale, ratio=ratio)

        def declare_state_and_memory(self, previous_state):
            state, (image_q, temp_q) = super().declare_state_and_memory(previous_state)
            # One uint64 per batch row holding the epoch key (FFCV hands out per-slot views of it).
            return state, (image_q, temp_q, AllocationQuery((1,), np.dtype("<u8")))

        def generate_code(self):
            jpg = IMAGE_MODES["jpg"]
            mem_read = self.memory_read
            my_range = Compiler.get_iterator()
            imdecode_c = Compiler.compile(imdecode)
            resize_crop_c = Compiler.compile(resize_crop)
            _, crop_and_flip = kernels()
            scale0, scale1 = float(self.scale[0]), float(self.scale[1])
            log_r0, log_r1 = float(np.log(self.ratio[0])), float(np.log(self.ratio[1]))

            def decode(batch_indices, my_storage, metadata, storage_state):
                destination, temp_storage, keys = my_storage
                key = keys[0, 0]
                for dst_ix in my_range(len(batch_indices)):
                    source_ix = batch_indices[dst_ix]
                    field = metadata[source_ix]
                    image_data = mem_read(field["data_ptr"], storage_state)
                    height = np.uint32(field["height"])
                    width = np.uint32(field["width"])
                    if field["mode"] == jpg:
                        temp_buffer = temp_storage[dst_ix]
                        imdecode_c(image_data, temp_buffer, height, width, height, width, 0, 0, 1, 1, False, False)
                        selected_size = 3 * height * width
                        temp_buffer = temp_buffer.reshape(-1)[:selected_size]
                        temp_buffer = temp_buffer.reshape(height, width, 3)
                    else:
                        temp_buffer = image_data.reshape(height, width, 3)
                    i, j, h, w, flip = crop_and_flip(key, source_ix, np.int64(height), np.int64(width),
                                                     scale0, scale1, log_r0, log_r1)
                    out = destination[dst_ix]
                    resize_crop_c(temp_buffer, i, i + h, j, j + w, out)
                    if flip:
                        cols = out.shape[1]
                        for r in range(out.shape[0]):
                            for c in range(cols // 2):
                                for ch in range(out.shape[2]):
                                    tmp = out[r, c, ch]
                                    out[r, c, ch] = out[r, cols - 1 - c, ch]
                                    out[r, cols - 1 - c, ch] = tmp
                return destination[:len(batch_indices)]

            decode.is_parallel = True
            return decode

    return SeededRandomResizedCropFlipDecoder


_DECODER = None


def seeded_crop_flip_decoder(output_size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """A new SeededRandomResizedCropFlipDecoder (the class is built on first use: it subclasses FFCV's)."""
    global _DECODER
    if _DECODER is None:
        _DECODER = _decoder_class()
    return _DECODER(output_size, scale=scale, ratio=ratio)


def seeded_epoch_iterator(loader, order: np.ndarray, key: int | None):
    """FFCV's EpochIterator over `order`, with `key` written into every seeded decoder's key buffer before its
    worker thread starts (key None: a plain EpochIterator)."""
    from ffcv.loader.epoch_iterator import EpochIterator

    if key is None:
        return EpochIterator(loader, order)

    class SeededEpochIterator(EpochIterator):
        def start(self):
            # __init__ allocates the buffers, then calls start(): the last moment before decoding begins.
            for node_id, node in self.loader.graph.id_to_node.items():
                op = getattr(node, "decoder", None)
                if _DECODER is not None and isinstance(op, _DECODER):
                    self.memory_allocations["operation"][node_id][2][...] = np.uint64(key)
            super().start()

    return SeededEpochIterator(loader, order)
