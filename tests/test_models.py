"""Model builders: shapes, memory format, the paper's options, parameter counts and FLOPs."""
import pytest
import torch
import torch.nn as nn

from bigexp.config.schema import ModelConfig
from bigexp.models import ARCHS, build_model, count_params, example_input, forward_flops


def _cfg(arch, **kw):
    return ModelConfig(arch=arch, **kw)


@pytest.mark.parametrize("arch,batch,res", [("resnet50", 2, 64), ("resnet18", 2, 64),
                                            ("preact_resnet32", 4, 32), ("fmnist_resnet", 4, 32),
                                            ("fmnist_resnet", 4, 28)])
def test_output_shape(arch, batch, res):
    torch.manual_seed(0)
    cfg = _cfg(arch, num_classes=7)
    m = build_model(cfg)
    x = example_input(cfg, batch=batch, res=res)
    assert x.shape == (batch, 3, res, res)
    y = m(x)
    assert y.shape == (batch, 7)
    assert torch.isfinite(y).all()


def test_param_counts():
    # torchvision's published sizes (1000 classes) pin the torchvision builds to the reference architecture.
    assert count_params(build_model(_cfg("resnet18", num_classes=1000))) == 11_689_512
    assert count_params(build_model(_cfg("resnet50", num_classes=1000))) == 25_557_032
    # Pre-act ResNet-32, w=16, 10 classes, counted by hand: convs 3*16*9 (stem) + 10*16*16*9 (stage 1)
    # + 16*32*9 + 9*32*32*9 + 16*32 (stage 2, with the 1x1 shortcut) + 32*64*9 + 9*64*64*9 + 32*64 (stage 3)
    # = 463,792; BN gamma+beta: 2*(10*16 + 16 + 9*32 + 32 + 9*64 + 64) = 2,272 (incl. the final BN); fc 650.
    convs = 3 * 16 * 9 + 10 * 16 * 16 * 9 + 16 * 32 * 9 + 9 * 32 * 32 * 9 + 16 * 32 + 32 * 64 * 9 + 9 * 64 * 64 * 9 + 32 * 64
    bns = 2 * (10 * 16 + 16 + 9 * 32 + 32 + 9 * 64 + 64)
    m = build_model(_cfg("preact_resnet32"))
    assert count_params(m) == convs + bns + 64 * 10 + 10 == 466_714
    assert sum(1 for mod in m.modules() if isinstance(mod, nn.Conv2d)) == 33  # 31 on the main path + 2 shortcuts
    # fmnist_resnet, w=16: stem + 3 basic blocks (2 convs each) + 2 projection shortcuts = 9 convs.
    f = build_model(_cfg("fmnist_resnet"))
    assert sum(1 for mod in f.modules() if isinstance(mod, nn.Conv2d)) == 9
    assert count_params(f) == 78_042


def test_fmnist_resnet_flops():
    """fmnist_resnet (w=16) costs 25.0 MFLOPs per 32 px image (19.1 at 28 px), under the 40 MFLOPs budget;
    2 FLOPs per multiply-add, as torch's FlopCounterMode counts."""
    m = build_model(_cfg("fmnist_resnet"))
    f32 = forward_flops(m, example_input("fmnist_resnet", batch=2, res=32))
    f28 = forward_flops(m, example_input("fmnist_resnet", batch=2, res=28))
    assert f32 == pytest.approx(25.003264e6, rel=1e-6)
    assert f28 == pytest.approx(19.143424e6, rel=1e-6)
    assert f32 <= 40e6
    # by hand, in multiply-adds per image at 32 px: stem 1024*27*16, stage 1 2*1024*144*16, stage 2
    # 256*(144*32 + 288*32 + 16*32), stage 3 64*(288*64 + 576*64 + 32*64), fc 64*10
    macs = 1024 * 27 * 16 + 2 * 1024 * 144 * 16 + 256 * (144 * 32 + 288 * 32 + 16 * 32) \
        + 64 * (288 * 64 + 576 * 64 + 32 * 64) + 64 * 10
    assert f32 == 2 * macs


@pytest.mark.parametrize("arch", ["resnet18", "fmnist_resnet"])
def test_channels_last(arch):
    torch.manual_seed(0)
    a = build_model(_cfg(arch, channels_last=True, num_classes=5))
    torch.manual_seed(0)
    b = build_model(_cfg(arch, channels_last=False, num_classes=5))
    conv = next(mod for mod in a.modules() if isinstance(mod, nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    x = example_input(_cfg(arch, channels_last=True), batch=4)
    assert x.is_contiguous(memory_format=torch.channels_last)
    a.eval(), b.eval()
    with torch.no_grad():
        # same init, same math; only the memory layout (and so the summation order) differs
        torch.testing.assert_close(a(x), b(x.contiguous()), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch,last_bn", [("resnet18", "bn2"), ("resnet50", "bn3"),
                                          ("preact_resnet32", "bn2"), ("fmnist_resnet", "bn2")])
def test_zero_init_residual(arch, last_bn):
    on = build_model(_cfg(arch, zero_init_residual=True, channels_last=False))
    off = build_model(_cfg(arch, channels_last=False))
    blocks = [mod for name, mod in on.named_modules() if name.count(".") == 1 and name.startswith("layer")]
    assert blocks
    for blk in blocks:
        assert torch.count_nonzero(getattr(blk, last_bn).weight) == 0
    assert all(torch.all(getattr(b, last_bn).weight == 1) for name, b in off.named_modules()
               if name.count(".") == 1 and name.startswith("layer"))


def test_norm_affine_and_frozen_classifier():
    m = build_model(_cfg("resnet18", norm_affine="freeze", freeze_classifier=True))
    bns = [mod for mod in m.modules() if isinstance(mod, nn.BatchNorm2d)]
    assert len(bns) == 20
    assert all(not p.requires_grad for bn in bns for p in bn.parameters())
    assert not m.fc.weight.requires_grad and not m.fc.bias.requires_grad
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert len(trainable) == 20 and all(n.endswith("weight") and "conv" in n or "downsample.0" in n for n in trainable)

    off = build_model(_cfg("preact_resnet32", norm_affine="off"))
    assert all(mod.weight is None and mod.bias is None and not mod.affine
               for mod in off.modules() if isinstance(mod, nn.BatchNorm2d))
    assert count_params(off) == 466_714 - 2_272
    off.train()
    assert off(example_input("preact_resnet32")).shape == (4, 10)


def test_bn_eps_is_used():
    m = build_model(_cfg("fmnist_resnet", bn_eps=1e-3))
    assert {mod.eps for mod in m.modules() if isinstance(mod, nn.BatchNorm2d)} == {1e-3}


def test_bad_config_names_the_key():
    with pytest.raises(ValueError, match="model.arch"):
        build_model(_cfg("resnet51"))
    with pytest.raises(ValueError, match="model.zero_init_residual"):
        build_model(_cfg("resnet18", zero_init_residual=True, norm_affine="off"))
    with pytest.raises(ValueError, match="model.norm_affine"):
        build_model(_cfg("resnet18", norm_affine="maybe"))
    with pytest.raises(ValueError, match="model.arch"):
        example_input("resnet51")


def test_archs_listed_in_schema():
    from dataclasses import fields
    arch = next(f for f in fields(ModelConfig) if f.name == "arch")
    assert arch.metadata["model_arch"] and all(a in arch.metadata["help"] for a in ARCHS)
