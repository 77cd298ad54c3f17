"""Which memory format a run uses, and the CPU kernel bug that decides where channels-last is safe.

Channels-last is a GPU optimisation (NHWC tensor-core kernels). On CPU it selects oneDNN's NHWC convolutions, and
torch 2.14.1's oneDNN has an open bug there, upstream oneDNN #6035: the weight gradient of a 1x1 convolution with
stride > 1 on a channels-last input with fewer input channels than the kernel's channel block (measured here: 3-6
crash, 2-7 is the class the issue names; 1 and >= 8 pass) writes past a scratch buffer. On AVX2 that is a heap
corruption (SIGSEGV / "double free") with one thread and a silently wrong weight gradient (relative error up to 0.5)
or a hang with two; AVX-512 machines can return wrong gradients without crashing. A small user network with a
projection shortcut (a ResNet of width 4) hits it; ResNet-50 and the shipped widths do not.

So: `null` (the default) means channels-last on CUDA and the plain NCHW format on CPU, and asking for channels-last
on CPU with a layer of that class is refused before any step, naming the layer (`check_cpu_channels_last`).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from bigexp.errors import ConfigError

ONEDNN_6035 = ("oneDNN #6035 (1x1 convolution backward_weights writes past the rtus workspace, nhwc, "
               "IC < ic_block; open upstream)")
# Input channels per group of the affected class: below the smallest oneDNN channel block (8 on AVX2).
AFFECTED_IN_CHANNELS = range(2, 8)


def resolve_channels_last(requested: Optional[bool], device: torch.device | str) -> bool:
    """`model.channels_last` / `data.channels_last` as a bool: null -> True on CUDA, False elsewhere."""
    if requested is not None:
        return bool(requested)
    return torch.device(device).type == "cuda"


def resolve_memory_format(cfg, device: torch.device | str) -> None:
    """Fill in the null channels-last keys of a Config in place: the model's from the device, the data's from the
    model's (a channels-last batch into an NCHW model still runs NHWC kernels, so they should agree)."""
    cfg.model.channels_last = resolve_channels_last(cfg.model.channels_last, device)
    if cfg.data.channels_last is None:
        cfg.data.channels_last = cfg.model.channels_last


def onednn_6035_convs(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    """The Conv2d layers of `model` in oneDNN #6035's class: 1x1 kernel, stride > 1, 2-7 input channels per group."""
    hits = []
    for name, m in model.named_modules():
        if (isinstance(m, nn.Conv2d) and tuple(m.kernel_size) == (1, 1) and tuple(m.stride) != (1, 1)
                and m.in_channels // m.groups in AFFECTED_IN_CHANNELS):
            hits.append((name, m))
    return hits


def check_cpu_channels_last(model: nn.Module, device: torch.device | str, channels_last: bool,
                            key: str = "model.channels_last") -> None:
    """Refuse channels-last on CPU for a model with a layer in oneDNN #6035's class (ConfigError naming it)."""
    if not channels_last or torch.device(device).type != "cpu":
        return
    hits = onednn_6035_convs(model)
    if not hits:
        return
    name, conv = hits[0]
    more = f" (and {len(hits) - 1} more)" if len(hits) > 1 else ""
    raise ConfigError(
        f"{key} = true on CPU: layer {name!r}{more} is a 1x1 stride-{conv.stride[0]} conv with "
        f"{conv.in_channels // conv.groups} input channels, whose channels-last weight gradient crashes or comes "
        f"back wrong in this torch ({torch.__version__}): {ONEDNN_6035}. Set {key}=false (the CPU default) "
        f"or widen the layer to >= {AFFECTED_IN_CHANNELS.stop} input channels")
