"""`engine.precision`: what bf16 and bf16_autocast keep in which dtype under the real DeepSpeed engine.

bf16 casts the whole model to bf16, BatchNorm running statistics included (DeepSpeed's data_types.buffer_dtype),
with fp32 masters in DeepSpeed's optimizer wrapper. bf16_autocast (DeepSpeed's torch_autocast mode) keeps the model,
its BatchNorm statistics and ExpSGD on fp32 and runs only convolutions and matmuls in bf16: the conv outputs are bf16,
everything the optimizer and the eval-mode statistics see is fp32.
"""
from __future__ import annotations

import torch

from _arms import build_pair, make_config  # bench/ is on sys.path through conftest
from bigexp.run.distributed import init_distributed
from bigexp.run.engine import deepspeed_config


def _conv_output_dtypes(model):
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
             for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    return seen, hooks


def test_deepspeed_config_sections():
    cfg = make_config("fmnist_resnet", 32, 16, "bf16_autocast", channels_last=False, device="cpu")
    ds = deepspeed_config(cfg, world_size=1)
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"} and "bf16" not in ds
    cfg.engine.precision = "bf16"
    ds = deepspeed_config(cfg, world_size=1)
    assert ds["bf16"]["enabled"] and ds["data_types"]["buffer_dtype"] == "bf16" and "torch_autocast" not in ds


def test_autocast_keeps_weights_and_bn_statistics_fp32_and_runs_convs_in_bf16():
    ctx = init_distributed("cpu")
    torch.set_num_threads(2)
    cfg = make_config("fmnist_resnet", 32, 16, "bf16_autocast", channels_last=False, device="cpu")
    arm, _ = build_pair(cfg, ctx, res=32, batch=16, with_plain=False)
    bn = next(m for m in arm.model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = [p.detach().clone() for p in arm.model.parameters()]
    seen, hooks = _conv_output_dtypes(arm.model)
    for _ in range(3):
        arm.step()
    for h in hooks:
        h.remove()
    assert set(seen) == {torch.bfloat16}                       # the convs ran in bf16
    assert all(p.dtype == torch.float32 for p in arm.model.parameters())
    assert bn.running_mean.dtype == torch.float32 and bn.running_var.dtype == torch.float32
    assert any(not torch.equal(a, p) for a, p in zip(before, arm.model.parameters()))  # it trained
    assert arm.engine.client_optimizer.param_groups[0]["params"][0].dtype == torch.float32


def test_full_bf16_casts_bn_statistics():
    ctx = init_distributed("cpu")
    cfg = make_config("fmnist_resnet", 32, 16, "bf16", channels_last=False, device="cpu")
    arm, _ = build_pair(cfg, ctx, res=32, batch=16, with_plain=False)
    arm.step()
    bn = next(m for m in arm.model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert bn.running_mean.dtype == torch.bfloat16 and next(arm.model.parameters()).dtype == torch.bfloat16
