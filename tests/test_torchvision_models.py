"""Any torchvision classification model as `model.arch`: building (options honoured, nothing downloaded), the
validator's error for a bad name, and scale-invariance detection across the families.

Every invariance claim is checked here by an INDEPENDENT numeric test, not the detector's own check: a float64
copy with every norm's eps set to 1e-20 (so only true invariance is left), dropout and stochastic depth off
(p = 0), train mode (batch statistics); each claimed set is scaled by 2.5 and by 0.3, alone, and all sets at
once with a different factor each; the output must not move beyond 1e-9 relative. float64 round-off through
these depths measures <= 1e-13, and a wrong claim moves the output by O(1e-2..1), so 1e-9 separates them.
"""
import copy

import pytest
import torch
import torch.nn as nn
import torchvision
from torchvision.models.vision_transformer import VisionTransformer
from torchvision.ops import StochasticDepth

from bigexp.config.load import from_dict
from bigexp.config.schema import ModelConfig
from bigexp.errors import ConfigError
from bigexp.models import build_model, classifier_layer, default_res, example_input
from bigexp.optim.invariance import find_scale_invariant

TOL = 1e-9
NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here on one thread (conftest.one_thread)."""


def _exact_copy(model: nn.Module) -> nn.Module:
    """float64, norm eps 1e-20, every dropout / stochastic depth / attention dropout switched off, zero weight
    matrices (a zero-init head) drawn at random: a claim must hold for any weights."""
    m = copy.deepcopy(model).double()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() > 1 and not p.any():   # ViT's zero-init head would make every output 0 (0/0 check)
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.05)
    for mod in m.modules():
        if isinstance(mod, NORMS):
            mod.eps = 1e-20
        if isinstance(mod, (nn.modules.dropout._DropoutNd, StochasticDepth)):
            mod.p = 0.0
        if isinstance(mod, nn.MultiheadAttention):
            mod.dropout = 0.0
    return m


def _forward(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    m.train()
    with torch.no_grad():
        torch.manual_seed(0)
        return m(x)


def _rel_change(m: nn.Module, x: torch.Tensor, base: torch.Tensor, scales: dict) -> float:
    """Output change when each named parameter is multiplied by its factor (weights and buffers restored)."""
    params = dict(m.named_parameters())
    state = copy.deepcopy(m.state_dict())
    with torch.no_grad():
        for n, c in scales.items():
            params[n].mul_(c)
    y = _forward(m, x)
    m.load_state_dict(state)
    return ((y - base).norm() / base.norm()).item()


def assert_claims_hold(model: nn.Module, x: torch.Tensor, report, per_set: bool = True) -> None:
    """The independent check of every invariant set in `report` (see the module docstring)."""
    m = _exact_copy(model)
    x = x.double()
    base = _forward(m, x)
    sets = report.invariant_sets
    for c in (2.5, 0.3):
        for s in (sets if per_set else []):
            rel = _rel_change(m, x, base, {n: c for n in s.params})
            assert rel <= TOL, (s.name, c, rel, s.reason)
        mixed = {n: c ** (1 + k / max(len(sets), 1)) for k, s in enumerate(sets) for n in s.params}
        rel = _rel_change(m, x, base, mixed)
        assert rel <= TOL, ("all sets at once", c, rel)


def invariant_share(report) -> float:
    """Share of the trainable weights (by element count) in invariant sets."""
    trainable = sum(e.numel for e in report.entries if e.status != "frozen")
    return sum(e.numel for e in report.entries if e.status == "invariant") / trainable


def _tiny_vit() -> nn.Module:
    """torchvision's ViT code at toy size (ViT-B/16's depth 12, width 768 at 224 px costs seconds per forward)."""
    return VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                             num_classes=10)


def _bn_positions(model: nn.Module, x: torch.Tensor) -> int:
    """The fewest positions per image and channel any BatchNorm sees in a forward of `x`."""
    seen = []
    hooks = [m.register_forward_pre_hook(lambda mod, inp: seen.append(inp[0][0, 0].numel()))
             for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    _forward(model, x)
    for h in hooks:
        h.remove()
    return min(seen, default=0)


# (name, measured share of weights in invariant sets; the test asserts at least share - 0.005, what stays plain)
FAST = [("mobilenet_v3_small", 0.297, "features.1.block.1.fc1.weight"),      # SE block (hardsigmoid gate)
        ("shufflenet_v2_x0_5", 0.948, "fc.weight"),
        ("mnasnet0_5", 0.965, "classifier.1.weight"),
        ("regnet_y_400mf", 0.821, "trunk_output.block1.block1-0.f.se.fc1.weight"),
        ("efficientnet_b0", 0.828, "features.1.0.block.1.fc2.weight"),
        ("vit_tiny", 0.735, "encoder.layers.encoder_layer_0.self_attention.in_proj_weight")]
SLOW = [("resnet18", 0.999, "fc.weight"), ("resnext50_32x4d", 0.996, "fc.weight"),
        ("wide_resnet50_2", 0.999, "fc.weight"), ("vgg11_bn", 0.069, "classifier.0.weight"),
        ("mobilenet_v2", 0.979, "classifier.1.weight"), ("regnet_x_400mf", 0.992, "fc.weight"),
        ("densenet121", 0.955, "features.denseblock1.denselayer1.conv2.weight"),
        ("convnext_tiny", 0.518, "features.1.0.block.3.weight"),
        ("vit_b_16", 0.420, "encoder.layers.encoder_layer_0.mlp.0.weight")]


def _family_case(name: str):
    """(model, example batch of 2) at the family's default resolution (ViTs at 32 px: image_size=32)."""
    torch.manual_seed(0)
    if name == "vit_tiny":
        return _tiny_vit(), example_input("resnet18", batch=2, res=32)
    if name.startswith("vit_"):
        return torchvision.models.get_model(name, weights=None, num_classes=10, image_size=32), \
            example_input(name, batch=2, res=32)
    cfg = ModelConfig(arch=name, num_classes=10, channels_last=False)
    return build_model(cfg), example_input(cfg, batch=2)


def _check_family(name: str, share: float, plain: str) -> None:
    model, x = _family_case(name)
    report = find_scale_invariant(model, x, check="grouped")
    assert invariant_share(report) >= share - 0.005, (name, invariant_share(report))
    assert report.entry(plain).status == "plain", report.entry(plain)
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        assert _bn_positions(model, x) >= 4, name     # default res: the last BN stage sees >= 2x2 per image
    # > 10M weights: all sets at once only (2 forwards per c; their ResNet-style sets are checked one by one on
    # resnet18, and a false claim among them would still move the output)
    assert_claims_hold(model, x, report, per_set=sum(p.numel() for p in model.parameters()) < 10_000_000)


@pytest.mark.parametrize("name,share,plain", FAST, ids=[c[0] for c in FAST])
def test_family_claims_hold_independently(name, share, plain):
    _check_family(name, share, plain)


@pytest.mark.slow   # 5-30 s each on one core: big nets, or 50-70 sets to scale one by one
@pytest.mark.parametrize("name,share,plain", SLOW, ids=[c[0] for c in SLOW])
def test_family_claims_hold_independently_big(name, share, plain):
    _check_family(name, share, plain)


class _Claims:
    """A report that claims the given parameter sets invariant (to test the independent check itself)."""

    def __init__(self, *sets):
        self.invariant_sets = [type("S", (), {"params": list(s), "name": s[0], "reason": "claimed"})() for s in sets]


@pytest.mark.parametrize("claim", [["encoder.layers.encoder_layer_0.mlp.0.weight",        # before GELU
                                    "encoder.layers.encoder_layer_0.mlp.0.bias"],
                                   ["encoder.layers.encoder_layer_0.self_attention.in_proj_weight"],   # Q, K, V
                                   ["encoder.layers.encoder_layer_1.mlp.3.weight",        # without the stream
                                    "encoder.layers.encoder_layer_1.mlp.3.bias"],
                                   ["heads.head.weight", "heads.head.bias"]])
def test_independent_check_catches_a_false_claim(claim):
    model, x = _family_case("vit_tiny")
    with pytest.raises(AssertionError):
        assert_claims_hold(model, x, _Claims(claim))


def test_vit_stream_is_one_joint_set_through_attention():
    """Pre-norm ViT: patch conv, class token, position embedding, every out_proj and second MLP linear are
    scaled together (every use of the stream is a LayerNorm); Q/K/V and the first MLP linear stay plain."""
    model, x = _family_case("vit_tiny")
    report = find_scale_invariant(model, x)
    (s,) = report.invariant_sets
    assert s.joint and {"conv_proj.weight", "class_token", "encoder.pos_embedding"} <= set(s.params)
    for i in range(2):
        blk = f"encoder.layers.encoder_layer_{i}"
        assert {f"{blk}.self_attention.out_proj.weight", f"{blk}.mlp.3.weight"} <= set(s.params)
        assert "softmax" in report.entry(f"{blk}.self_attention.in_proj_weight").reason


# ---------------------------------------------------------------------------------------------------------
# building: the arch name, the ModelConfig options


def test_bad_arch_names_the_key_with_a_did_you_mean():
    with pytest.raises(ConfigError) as err:
        from_dict({"model": {"arch": "convnxt_tiny"}}, source="x.yaml")
    assert "model.arch = 'convnxt_tiny' (from x.yaml)" in str(err.value)
    assert "did you mean convnext_tiny?" in str(err.value)
    with pytest.raises(ConfigError, match="model.arch.*did you mean resnet18"):
        build_model(ModelConfig(arch="resnt18"))
    assert from_dict({"model": {"arch": "vit_b_16"}}).model.arch == "vit_b_16"


def test_bigexp_arch_validates_without_importing_torchvision():
    import subprocess
    import sys
    code = ("import sys; from bigexp.config.load import from_dict; from_dict({'model': {'arch': 'resnet50'}}); "
            "assert 'torchvision' not in sys.modules, 'torchvision imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_options_honoured_on_a_torchvision_family(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))     # weights=None: nothing may land in the hub cache
    cfg = ModelConfig(arch="mobilenet_v3_small", num_classes=7, bn_eps=1e-3, freeze_classifier=True)
    m = build_model(cfg)
    assert {b.eps for b in m.modules() if isinstance(b, nn.modules.batchnorm._BatchNorm)} == {1e-3}
    assert classifier_layer(m) is m.classifier[3] and m.classifier[3].out_features == 7
    assert [n for n, p in m.named_parameters() if not p.requires_grad] == ["classifier.3.weight", "classifier.3.bias"]
    off = build_model(ModelConfig(arch="mobilenet_v3_small", norm_affine="off"))
    assert all(b.weight is None for b in off.modules() if isinstance(b, nn.BatchNorm2d))
    with pytest.raises(ConfigError, match="model.zero_init_residual: torchvision's mobilenet_v3_small"):
        build_model(ModelConfig(arch="mobilenet_v3_small", zero_init_residual=True))
    assert list(tmp_path.iterdir()) == []


def test_zero_init_residual_and_classifier_heads():
    torch.manual_seed(0)
    m = build_model(ModelConfig(arch="resnet34", zero_init_residual=True))
    assert all(not b.bn2.weight.any() for layer in (m.layer1, m.layer4) for b in layer)
    sq = build_model(ModelConfig(arch="squeezenet1_1", freeze_classifier=True))
    assert classifier_layer(sq) is sq.classifier[1] and not sq.classifier[1].weight.requires_grad
    vit = torchvision.models.get_model("vit_b_32", weights=None, num_classes=3, image_size=32)
    assert classifier_layer(vit) is vit.heads.head


def test_default_resolutions():
    assert [default_res(a) for a in ("resnet50", "fmnist_resnet", "vgg11_bn", "vit_b_16", "efficientnet_b0",
                                     "convnext_tiny", "inception_v3")] == [64, 32, 32, 224, 64, 32, 107]
    assert example_input("maxvit_t", batch=2).shape == (2, 3, 224, 224)
