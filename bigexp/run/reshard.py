"""Resume sharded optimizer state (ZeRO 1/2, BF16_Optimizer) on another number of ranks than wrote it.

Why our own: DeepSpeed 0.19.8 refuses it ("Automatic adjustment of ZeRO's optimizer state partitioning with a new
world size is not currently supported") unless the checkpoint was written with `elastic_checkpoint` (ZeRO's optimizer
only, not BF16_Optimizer) or converted to a universal checkpoint, whose converter (`ds_to_universal`) does not handle
SGD-style state yet (DeepSpeed #8608). The shard files DeepSpeed writes anyway hold every number needed, so nothing
extra is saved: a resume on another world size reads every old rank's shard and cuts out the new rank's part. Each
rank reads all shards once: the whole fp32 masters and momentum, 2 x 4 bytes per parameter (ResNet-50: ~200 MB).

The layout this relies on (deepspeed/runtime/zero/stage_1_and_2.py and bf16_optimizer.py, 0.19.8): each param group
is one flat vector -- its params in order (ZeRO pads each one to a 16-byte boundary, which does not depend on the
world size), then zeros up to a multiple of 2 x world size -- cut into world-size equal partitions. Rank r's fp32
master (`single_partition_of_fp32_groups[i]` / `fp32_groups_flat_partition[i]`, the one param of the client
optimizer's group i) and the client optimizer's state of it (momentum_buffer) are partition r. Concatenated and cut
to the group's unpadded length, the partitions are the same vector on every world size: resharding is concatenate,
cut, re-pad, slice. The per-group scalars (lr, ExpSGD's exp_* bookkeeping) sit in the param groups, the same on every
rank, and come from rank 0's shard.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.distributed as dist

from bigexp.errors import CheckpointError

# DeepSpeed's key names (deepspeed.checkpoint.constants), spelled out: importing deepspeed costs seconds.
OPTIMIZER_STATE_DICT = "optimizer_state_dict"
BASE_OPTIMIZER_STATE = "base_optimizer_state"
SINGLE_PARTITION_OF_FP32_GROUPS = "single_partition_of_fp32_groups"
GROUP_PADDINGS = "group_paddings"
PARAM_ALIGNMENT_PADDINGS = "param_alignment_paddings"
ZERO_STAGE = "zero_stage"

# zero_pp_rank_<dp>_mp_rank_00_optim_states.pt (fp32/fp16 engines) or bf16_zero_pp_rank_... (bf16).
_SHARD = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt")


def shard_files(path: Path, world_size: int) -> list[Path]:
    """The optimizer shards of checkpoint directory `path`, written by `world_size` ranks, in data-parallel rank
    order. Raises CheckpointError unless there is exactly one per rank."""
    found: dict[int, Path] = {}
    for f in Path(path).iterdir():
        m = _SHARD.fullmatch(f.name)
        if m:
            found[int(m.group(1))] = f
    if sorted(found) != list(range(world_size)):
        raise CheckpointError(f"{path}: expected optimizer shards of data-parallel ranks 0..{world_size - 1} "
                              f"(its manifest says {world_size} ranks), found ranks {sorted(found)}")
    return [found[r] for r in range(world_size)]


def unpadded_length(masters: list[torch.Tensor], paddings: list[int], *, lean: bool) -> int:
    """Elements of one group's flat vector before its end padding, from every old rank's master partition and
    recorded padding. lean: the partitions were saved without their padding (ZeRO's do, BF16_Optimizer's do not)."""
    return sum(m.numel() - (0 if lean else pad) for m, pad in zip(masters, paddings))


def reshard(pieces: list[torch.Tensor], length: int, part: int, rank: int) -> torch.Tensor:
    """Partition `rank` (`part` elements) of the flat vector cat(pieces)[:length], zeros past `length`: how
    DeepSpeed pads the end of a group to its alignment."""
    flat = torch.cat([p.reshape(-1) for p in pieces])
    if flat.numel() < length:
        raise CheckpointError(f"optimizer shards hold {flat.numel()} elements of a group of {length}")
    out = torch.zeros(part, dtype=flat.dtype)
    lo, hi = rank * part, min((rank + 1) * part, length)
    if hi > lo:
        out[: hi - lo] = flat[lo:hi]
    return out


def _load_shard(f: Path) -> dict:
    try:
        return torch.load(f, map_location="cpu", weights_only=False)[OPTIMIZER_STATE_DICT]
    except Exception as e:  # a damaged file raises anything from pickle/zip/KeyError: name the file instead
        raise CheckpointError(f"{f}: unreadable optimizer shard ({type(e).__name__}: {e})") from e


def _check_layout(opt, saved: list[dict], path: Path) -> None:
    """Refuse shards whose groups or per-parameter padding are not this optimizer's (another model, another
    zero_optimization.parameter_alignment): cutting them would misplace every element after the first difference."""
    n_groups = len(opt.optimizer.param_groups)
    for sd in saved:
        if len(sd[SINGLE_PARTITION_OF_FP32_GROUPS]) != n_groups:
            raise CheckpointError(f"{path}: {len(sd[SINGLE_PARTITION_OF_FP32_GROUPS])} param groups in the "
                                  f"optimizer shards, this run has {n_groups}")
    mine = getattr(opt, "round_robin_bit16_padding", None)
    theirs = saved[0].get(PARAM_ALIGNMENT_PADDINGS)
    if mine is not None and theirs is not None and list(theirs) != list(mine):
        raise CheckpointError(f"{path}: the optimizer shards pad parameters differently from this run "
                              "(zero_optimization.parameter_alignment changed?)")


def _resharded_state(base_state: list[dict], length: int, part: int, rank: int) -> dict:
    """Resharded per-parameter optimizer state of one group, from every old rank's state of its flat partition:
    tensors with elements (momentum_buffer) are resharded, scalars (a step count) taken from rank 0."""
    out = {}
    for name, v0 in base_state[0].items():
        if torch.is_tensor(v0) and v0.dim() > 0:
            out[name] = reshard([s[name] for s in base_state], length, part, rank)
        else:
            out[name] = v0
    return out


def load_resharded_optimizer(ds_engine, path: Path, saved_world_size: int) -> None:
    """Collective in spirit, but no communication: every rank reads every shard of `path`.

    Call after `ds_engine.load_checkpoint(..., load_optimizer_states=False)` has loaded the weights, scheduler and
    client state (and refilled the masters from the low-precision weights): this rank's fp32 master partitions and
    its client optimizer's state and param groups are then cut from the `saved_world_size` old shards, as if the
    checkpoint had been written on this many ranks."""
    opt = ds_engine.optimizer                         # DeepSpeedZeroOptimizer or BF16_Optimizer
    rank = dist.get_rank(group=opt.dp_process_group)
    world = dist.get_world_size(group=opt.dp_process_group)
    saved = [_load_shard(f) for f in shard_files(path, saved_world_size)]
    _check_layout(opt, saved, path)
    lean = ZERO_STAGE in saved[0]   # only ZeRO's optimizer records its stage, and it saves masters without padding
    base0 = saved[0][BASE_OPTIMIZER_STATE]
    state = {}
    for i, group in enumerate(opt.optimizer.param_groups):
        master = group["params"][0]
        pieces = [sd[SINGLE_PARTITION_OF_FP32_GROUPS][i] for sd in saved]
        length = unpadded_length(pieces, [sd[GROUP_PADDINGS][i] for sd in saved], lean=lean)
        if master.numel() * world < length:
            raise CheckpointError(f"{path}: param group {i} has {length} elements in the checkpoint, "
                                  f"{master.numel() * world} here")
        with torch.no_grad():
            master.copy_(reshard(pieces, length, master.numel(), rank).to(master.device))
        key = base0["param_groups"][i]["params"][0]
        per_rank = [sd[BASE_OPTIMIZER_STATE]["state"].get(key, {}) for sd in saved]
        if per_rank[0]:
            state[key] = _resharded_state(per_rank, length, master.numel(), rank)
    # torch's load: state cast to each master's dtype and device; param groups (lr, exp_* bookkeeping) restored.
    opt.optimizer.load_state_dict({"state": state, "param_groups": base0["param_groups"]})
    load_global = getattr(opt, "_load_global_state", None)   # ZeRO: loss scaler, clip_grad; BF16_Optimizer: none
    if load_global is not None:
        load_global(saved[0])
