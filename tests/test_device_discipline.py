"""Every tensor the training loop hands to a collective lives on the rank's device (project issue 17, bug 1: on GPU
the NaN/stop flags, the val sums and the logged loss were CPU tensors, which an NCCL-only group cannot reduce).

How a CPU test sees it: on a GPU the bug is a tensor made with no `device=`, which lands on the default device
(the CPU) instead of ctx.device. On CPU both are the CPU, so here `DefaultDeviceIsNotTheDevice` moves every
device-less tensor constructor called from the loop's modules (bigexp.run.step, bigexp.run.loop) to `meta`: a
tensor made with device=ctx.device is untouched, one made without it (or derived from one) is on meta, and
DistContext(check_device=True) (BIGEXP_CHECK_DEVICE=1) refuses it at the collective, even in a one-rank run. A meta
tensor read back raises too, so the bug cannot hide behind a host read either.
"""
from __future__ import annotations

import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors

from bigexp.run.distributed import ENV_CHECK_DEVICE, DistContext
from conftest import fmnist_betons
from test_loop_syncs import inprocess_cfg

WATCHED = ("bigexp.run.step", "bigexp.run.loop")


class DefaultDeviceIsNotTheDevice(TorchFunctionMode):
    """Tensor constructors (torch.tensor, zeros, full, randn, ...) called without device= from a module in
    `watched` make their tensor on `meta`; `.redirected` lists the call sites (file:line)."""

    def __init__(self, watched=WATCHED):
        super().__init__()
        self.watched = watched
        self.redirected: list[str] = []
        self.explicit = 0  # constructor calls from watched modules that named their device

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _device_constructors():
            frame = sys._getframe(1)
            while frame is not None and frame.f_globals.get("__name__", "").startswith("torch"):
                frame = frame.f_back
            module = frame.f_globals.get("__name__", "") if frame is not None else ""
            if module.startswith(self.watched):
                if kwargs.get("device") is None:
                    kwargs = {**kwargs, "device": "meta"}
                    self.redirected.append(f"{frame.f_code.co_filename}:{frame.f_lineno}")
                else:
                    self.explicit += 1
        return func(*args, **kwargs)


def test_check_device_refuses_a_tensor_off_the_device_even_with_one_rank():
    ctx = DistContext(device=torch.device("cpu"), check_device=True)
    ctx.all_reduce_sum(torch.zeros(2))  # on the device: fine
    with pytest.raises(RuntimeError, match="on meta, not on the rank's device cpu"):
        ctx.all_reduce_sum(torch.zeros(2, device="meta"))
    gpu = DistContext(device=torch.device("cuda", 0), check_device=True)
    with pytest.raises(RuntimeError, match="on cpu, not on the rank's device cuda:0"):
        gpu.all_reduce_sum(torch.zeros(2))
    DistContext(device=torch.device("cuda", 0), check_device=False).all_reduce_sum(torch.zeros(2))  # off: no check


def test_check_device_follows_the_environment(monkeypatch):
    monkeypatch.delenv(ENV_CHECK_DEVICE, raising=False)
    assert not DistContext().check_device
    monkeypatch.setenv(ENV_CHECK_DEVICE, "1")
    assert DistContext().check_device


def test_the_mode_catches_a_device_less_flag_at_the_collective():
    """The mechanism on a planted bug in this module: without device= the flag is on meta and refused."""
    ctx = DistContext(check_device=True)
    mode = DefaultDeviceIsNotTheDevice(watched=(__name__,))
    with mode:
        ok = torch.tensor([0.0, 1.0], device=ctx.device)
        ctx.all_reduce_sum(ok)
        bad = torch.tensor([0.0, 1.0])
        with pytest.raises(RuntimeError, match="on meta"):
            ctx.all_reduce_sum(bad)
    assert len(mode.redirected) == 1 and mode.explicit == 1


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return fmnist_betons(tmp_path_factory.mktemp("devdata"), train=192, val=32)


def test_loop_step_eval_and_log_keep_collectives_on_the_device(data, tmp_path, monkeypatch):
    """The real loop, every phase that reduces something: the step's flags, the val sums, a log line per step."""
    from bigexp.run.loop import train

    monkeypatch.setenv(ENV_CHECK_DEVICE, "1")  # init_distributed's DistContext checks its collectives
    cfg = inprocess_cfg(tmp_path, data, "dev", "optim.optimizer=expsgd", "log.every_steps=1")
    mode = DefaultDeviceIsNotTheDevice()
    with mode:
        result = train(cfg)
    assert result.global_step == 2 * (192 // 32) and result.val
    assert not mode.redirected, f"tensors made without device= in the loop: {mode.redirected}"
    assert mode.explicit > 0  # the mode saw the loop's constructors: it was not watching the wrong modules
