"""Scale-invariance detection: graph analysis, numeric confirmation, optimizer groups, running-stats rescaling.

Every claim of invariance is checked by scaling weights and watching the output; every claim of NON-invariance
is checked the same way (the output must move), so none of these tests can pass by detecting nothing.
"""
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bigexp.config.schema import ModelConfig
from bigexp.models import build_model, example_input
from bigexp.optim.invariance import find_scale_invariant, param_groups, running_stats_rescaler

C = 3.7


def _scaled_change(model, names, x, c=C):
    """Relative train-mode output change when the named params are scaled by c (state restored)."""
    params = dict(model.named_parameters())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    with torch.no_grad():
        y0 = model(x)
        model.load_state_dict(state)
        for n in names:
            params[n].mul_(c)
        y1 = model(x)
        model.load_state_dict(state)
    return ((y1 - y0).norm() / y0.norm()).item()


def _convs(model):
    return [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def _assert_sets_verified(report, tol=1e-4):
    # float32 forward: round-off amplified by depth stays well under 1e-4 (measured <= 6e-6 on these nets)
    for s in report.invariant_sets:
        assert s.rel_change is not None and s.rel_change <= tol, (s.name, s.rel_change)


# ---------------------------------------------------------------------------------------------------------
# the four architectures


@pytest.mark.slow   # 23 forwards of a ResNet-18
def test_resnet18_every_conv_individually_invariant():
    torch.manual_seed(0)
    cfg = ModelConfig(arch="resnet18", num_classes=10, channels_last=False)
    m = build_model(cfg)
    # 48 px: layer4 still sees 2x2 positions per image (8 values per channel for BN), at 56% of 64 px's cost
    r = find_scale_invariant(m, example_input(cfg, batch=2, res=48))
    convs = _convs(m)
    assert len(convs) == 20
    assert sorted(r.names("invariant")) == sorted(convs)
    assert len(r.invariant_sets) == 20 and not any(s.joint for s in r.invariant_sets)
    # post-activation: each conv feeds exactly one BatchNorm, the one right after it
    for s in r.invariant_sets:
        (norm,) = s.norms
        assert norm.kind == "BatchNorm2d" and norm.degree == 1
        layer = s.layers[0]
        expect = layer[:-1] + "1" if layer.endswith("downsample.0") else layer.replace("conv", "bn")
        assert norm.name == expect, (layer, norm.name)
    assert r.entry("fc.weight").status == "plain" and "output" in r.entry("fc.weight").reason
    assert r.entry("fc.bias").status == "plain" and "bias of a plain layer" in r.entry("fc.bias").reason
    assert r.entry("bn1.weight").reason == "norm affine of BatchNorm2d bn1"
    assert r.entry("fc.weight").rel_change > 0.1   # the classifier is visibly not invariant
    _assert_sets_verified(r)
    assert r.union_rel_change <= 1e-4
    text = r.format()
    assert "layer1.0.conv1.weight" in text and "feeds BatchNorm2d layer1.0.bn1" in text
    d = r.to_dict()
    assert d["counts"]["invariant"] == 20 and len(d["params"]) == 62


@pytest.mark.slow   # a ResNet-50 build plus a handful of forwards
def test_resnet50_every_conv_individually_invariant():
    torch.manual_seed(0)
    # channels-first: 2x cheaper on CPU (channels-last is tested in test_models.py)
    cfg = ModelConfig(arch="resnet50", num_classes=10, channels_last=False)
    m = build_model(cfg)
    # grouped check: 5 forwards instead of 57 (each set gets its own c; a failure would be bisected down)
    r = find_scale_invariant(m, example_input(cfg, batch=2, res=48), check="grouped")   # layer4: 2x2, as at 64 px
    convs = _convs(m)
    assert len(convs) == 53
    assert sorted(r.names("invariant")) == sorted(convs)
    assert len(r.invariant_sets) == 53 and not any(s.joint for s in r.invariant_sets)
    assert r.names("plain") == [n for n, _ in m.named_parameters() if n not in convs]
    # ResNet-50 amplifies round-off more than the small nets (measured max 2e-4 at 2x3x64x64)
    _assert_sets_verified(r, tol=1e-3)


@pytest.mark.slow   # ~25 forwards of a pre-act ResNet-32
def test_preact_resnet32_joint_residual_streams():
    torch.manual_seed(0)
    cfg = ModelConfig(arch="preact_resnet32", width=8)   # the structure, not the width, decides the sets
    m = build_model(cfg)
    x = example_input(cfg, batch=4, res=16)   # 16 px: stage 3 still sees 4x4 positions per image
    r = find_scale_invariant(m, x)
    assert sorted(r.names("invariant")) == sorted(_convs(m))  # all 33 convs, but not all alone
    joint = [s for s in r.invariant_sets if s.joint]
    single = [s for s in r.invariant_sets if not s.joint]
    assert len(joint) == 3 and len(single) == 15
    streams = [{"conv1.weight"} | {f"layer1.{i}.conv2.weight" for i in range(5)},
               {"layer2.0.shortcut.weight"} | {f"layer2.{i}.conv2.weight" for i in range(5)},
               {"layer3.0.shortcut.weight"} | {f"layer3.{i}.conv2.weight" for i in range(5)}]
    assert sorted(map(set, (s.params for s in joint)), key=sorted) == sorted(streams, key=sorted)
    assert {s.params[0] for s in single} == {f"layer{k}.{i}.conv1.weight" for k in (1, 2, 3) for i in range(5)}
    # the stage-1 stream is absorbed by the 5 block-entry BNs of stage 1 and the first BN of stage 2
    stage1 = next(s for s in joint if "conv1.weight" in s.params)
    assert sorted(n.name for n in stage1.norms) == sorted([f"layer1.{i}.bn1" for i in range(5)] + ["layer2.0.bn1"])
    assert "joint with 5 other layers through residual add" in r.entry("layer1.3.conv2.weight").reason
    _assert_sets_verified(r)
    # Joint is necessary, not an over-merge: scaling one member alone (stem, or one block's last conv)
    # changes the output at the percent level.
    assert _scaled_change(m, ["conv1.weight"], x) > 1e-2   # measured ~0.1
    assert _scaled_change(m, ["layer2.2.conv2.weight"], x) > 1e-2
    assert _scaled_change(m, sorted(streams[1]), x) < 1e-4


def test_fmnist_resnet():
    torch.manual_seed(0)
    cfg = ModelConfig(arch="fmnist_resnet")
    m = build_model(cfg)
    r = find_scale_invariant(m, example_input(cfg, batch=8))
    assert sorted(r.names("invariant")) == sorted(_convs(m)) and len(r.invariant_sets) == 9
    assert not any(s.joint for s in r.invariant_sets)
    assert r.counts()["plain"] == 20   # 9 BNs x (gamma, beta) + fc weight and bias
    _assert_sets_verified(r)
    json.dumps(r.to_dict())   # loggable as is


def test_bf16_model_is_checked_in_float32():
    """bf16 round-off (~1e-2) would fail every set at tol 1e-3; the check runs on a float32 copy instead and
    leaves the bf16 model untouched."""
    torch.manual_seed(0)
    cfg = ModelConfig(arch="fmnist_resnet")
    m = build_model(cfg).to(torch.bfloat16)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    r = find_scale_invariant(m, example_input(cfg, batch=8), check="grouped")
    assert len(r.invariant_sets) == 9
    _assert_sets_verified(r)
    assert all(torch.equal(before[k], v) and v.dtype == before[k].dtype for k, v in m.state_dict().items())


# ---------------------------------------------------------------------------------------------------------
# other norms, functional ops, negative cases


class _GNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.g1 = nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8)
        self.c2, self.g2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.GroupNorm(4, 8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = F.relu(self.g1(self.c1(x)))
        x = F.max_pool2d(F.relu(self.g2(self.c2(x))), 2)
        return self.fc(x.mean(dim=(2, 3)))


class _LNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.n1 = nn.Linear(12, 16), nn.LayerNorm(16)
        self.l2, self.n2 = nn.Linear(16, 16), nn.LayerNorm(16, elementwise_affine=False)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        x = x.flatten(1)
        x = self.n1(self.l1(x)).relu()
        x = F.dropout(F.relu(self.n2(self.l2(x))), 0.2, self.training)
        return self.head(x)


def test_groupnorm_net_with_conv_bias():
    torch.manual_seed(0)
    m = _GNNet()
    x = torch.randn(2, 3, 8, 8)
    r = find_scale_invariant(m, x)
    assert r.invariant_sets[0].params == ["c1.weight", "c1.bias"]   # the bias scales with its weight
    assert r.entry("c1.bias").reason == "bias of c1, scales with its weight"
    assert sorted(r.names("invariant")) == ["c1.bias", "c1.weight", "c2.weight"]
    assert [n.kind for s in r.invariant_sets for n in s.norms] == ["GroupNorm", "GroupNorm"]
    assert set(r.names("plain")) == {"g1.weight", "g1.bias", "g2.weight", "g2.bias", "fc.weight", "fc.bias"}
    _assert_sets_verified(r)
    # the weight alone, without its bias, is NOT invariant
    assert _scaled_change(m, ["c1.weight"], x) > 1e-3


def test_layernorm_net_with_dropout():
    torch.manual_seed(0)
    m = _LNNet()
    x = torch.randn(4, 3, 2, 2)
    r = find_scale_invariant(m, x)
    assert sorted(r.names("invariant")) == ["l1.bias", "l1.weight", "l2.bias", "l2.weight"]
    assert {n.kind for s in r.invariant_sets for n in s.norms} == {"LayerNorm"}
    assert r.entry("head.weight").status == "plain"
    _assert_sets_verified(r)   # dropout draws the same mask in every probe forward


class _NoNorm(nn.Module):
    """conv -> relu -> fc: nothing normalises the conv, so it is not invariant."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.conv(x)), 1).flatten(1))


def test_no_norm_path_is_not_invariant():
    torch.manual_seed(0)
    m = _NoNorm()
    r = find_scale_invariant(m, torch.randn(4, 3, 6, 6))
    assert r.names("invariant") == []
    e = r.entry("conv.weight")
    assert e.status == "plain" and "feeds Linear fc without a norm in between" in e.reason
    assert e.rel_change > 0.1
    groups, _ = param_groups(m, torch.randn(4, 3, 6, 6), lr=0.1, weight_decay=1e-4)
    assert [g["name"] for g in groups] == ["plain"]


class _ConvConvBN(nn.Module):
    """conv1 -> relu -> conv2 -> relu -> BN: both individually invariant (the BN input is degree 1 in each,
    degree 2 in both); with a bias on conv2, conv1 loses invariance (relu(W2 relu(c W1 x) + b) is not
    homogeneous in c, and the ReLU keeps BN's mean subtraction from removing b)."""

    def __init__(self, bias2: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=bias2)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = F.relu(self.bn(F.relu(self.conv2(F.relu(self.conv1(x))))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def test_degree_two_and_bias_breaking_invariance():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 6, 6)
    m = _ConvConvBN(bias2=False)
    r = find_scale_invariant(m, x)
    assert sorted(r.names("invariant")) == ["conv1.weight", "conv2.weight"]
    assert len(r.invariant_sets) == 2
    _assert_sets_verified(r)
    m = _ConvConvBN(bias2=True)
    nn.init.constant_(m.conv2.bias, 1.0)   # a bias of the size of the signal, so the breakage is visible
    r = find_scale_invariant(m, x)
    assert sorted(r.names("invariant")) == ["conv2.bias", "conv2.weight"]
    assert r.entry("conv1.weight").status == "plain"
    assert r.entry("conv1.weight").rel_change > 1e-3   # and numerically it does move


class _RawShortcutBlock(nn.Module):
    """A pre-act block whose projection shortcut reads the raw stream x (bearpaw-style): the shortcut term is
    degree 2 in (stream, shortcut) against degree 1 for conv2, so no uniform scaling works."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1, self.conv1 = nn.BatchNorm2d(4), nn.Conv2d(4, 8, 3, padding=1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.short = nn.Conv2d(4, 8, 1, bias=False)
        self.bn, self.fc = nn.BatchNorm2d(8), nn.Linear(8, 2)

    def forward(self, x):
        x = self.stem(x)
        out = self.conv2(F.relu(self.bn2(self.conv1(F.relu(self.bn1(x))))))
        out = out + self.short(x)
        return self.fc(F.relu(self.bn(out)).mean(dim=(2, 3)))


def test_degree_mismatch_at_residual_add_is_plain():
    torch.manual_seed(0)
    m = _RawShortcutBlock()
    x = torch.randn(4, 3, 6, 6)
    r = find_scale_invariant(m, x)
    assert r.names("invariant") == ["conv1.weight"]
    for n in ("stem.weight", "conv2.weight", "short.weight"):
        assert r.entry(n).status == "plain" and "degree [1, 2]" in r.entry(n).reason, r.entry(n).reason
    assert _scaled_change(m, ["stem.weight", "conv2.weight", "short.weight"], x) > 1e-2


class _Functional(nn.Module):
    """Functional convs/norms with raw Parameters, and a concatenation of two branches normalised together
    (one GroupNorm group across all channels, so neither branch is invariant alone)."""

    def __init__(self):
        super().__init__()
        self.wa = nn.Parameter(torch.randn(4, 3, 3, 3))
        self.wb = nn.Parameter(torch.randn(4, 3, 3, 3))
        self.w2 = nn.Parameter(torch.randn(6, 8, 1, 1))
        self.gamma = nn.Parameter(torch.ones(6))
        self.register_buffer("rm", torch.zeros(6))
        self.register_buffer("rv", torch.ones(6))
        self.head = nn.Parameter(torch.randn(2, 6))

    def forward(self, x):
        a = F.conv2d(x, self.wa, padding=1)
        b = F.conv2d(x, self.wb, padding=1) * 0.5
        h = F.group_norm(torch.cat([a, b], 1), 1)
        h = F.batch_norm(F.conv2d(F.relu(h), self.w2), self.rm, self.rv, self.gamma, None, self.training)
        h = F.layer_norm(F.relu(h).mean(dim=(2, 3)), (6,))
        return F.linear(h, self.head)


def test_functional_norms_and_concatenation_are_joint():
    torch.manual_seed(0)
    m = _Functional()
    x = torch.randn(4, 3, 5, 5)
    r = find_scale_invariant(m, x)
    assert sorted(r.names("invariant")) == ["w2", "wa", "wb"]
    (ab,) = [s for s in r.invariant_sets if s.joint]
    assert sorted(ab.params) == ["wa", "wb"] and "concatenation" in ab.reason
    assert [n.kind for n in ab.norms] == ["group_norm"]
    (w2,) = [s for s in r.invariant_sets if s.params == ["w2"]]
    assert w2.norms[0].kind == "batch_norm" and (w2.norms[0].running_mean, w2.norms[0].running_var) == ("rm", "rv")
    assert r.entry("gamma").status == "plain" and "norm affine" in r.entry("gamma").reason
    assert r.entry("head").status == "plain"
    _assert_sets_verified(r)
    assert _scaled_change(m, ["wa"], x) > 1e-2


class _BigEpsFunctionalBN(nn.Module):
    """The graph proves conv a invariant, but its functional BN has eps=10 (which the check cannot compensate),
    so the numeric check must catch it; conv b (BatchNorm2d module) stays invariant."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, bias=False), nn.Conv2d(4, 4, 3, bias=False)
        self.bn, self.fc = nn.BatchNorm2d(4), nn.Linear(4, 2)

    def forward(self, x):
        x = F.relu(F.batch_norm(self.a(x), None, None, training=True, eps=10.0))
        return self.fc(F.relu(self.bn(self.b(x))).mean(dim=(2, 3)))


@pytest.mark.parametrize("check", [True, "grouped"])
def test_numeric_check_demotes_a_wrong_graph_claim(check):
    torch.manual_seed(0)
    m = _BigEpsFunctionalBN()
    r = find_scale_invariant(m, torch.randn(4, 3, 7, 7), check=check)
    e = r.entry("a.weight")
    assert e.status == "plain" and e.reason.startswith("plain: numeric check failed") and e.rel_change > 1e-3
    assert r.names("invariant") == ["b.weight"] and r.entry("b.weight").rel_change <= 1e-5
    assert r.checked == check


def test_frozen_member_breaks_a_joint_set():
    """A frozen conv in the stage-1 stream is a constant; the rest of the stream alone is not invariant."""
    torch.manual_seed(0)
    cfg = ModelConfig(arch="preact_resnet32", channels_last=False)
    m = build_model(cfg)
    m.layer1[2].conv2.weight.requires_grad_(False)
    r = find_scale_invariant(m, example_input(cfg, batch=4, res=16), check="grouped")
    assert r.entry("layer1.2.conv2.weight").status == "frozen"
    for n in ["conv1.weight"] + [f"layer1.{i}.conv2.weight" for i in (0, 1, 3, 4)]:
        assert r.entry(n).status == "plain", n
        assert r.entry(n).rel_change > 1e-3
    assert len(r.invariant_sets) == 17   # 15 conv1 + the 2 intact streams


def test_untraceable_model_error_is_clear():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            return self.conv(x) if x.sum() > 0 else x

    with pytest.raises(RuntimeError, match="torch.fx could not trace Branchy"):
        find_scale_invariant(Branchy(), torch.randn(2, 3, 4, 4))


def test_state_and_modes_restored():
    torch.manual_seed(0)
    cfg = ModelConfig(arch="fmnist_resnet")
    m = build_model(cfg)
    m.eval()
    m.layer2.train()   # mixed modes survive
    before = {k: v.clone() for k, v in m.state_dict().items()}
    modes = {n: mod.training for n, mod in m.named_modules()}
    find_scale_invariant(m, example_input(cfg))
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)   # bitwise: weights and running stats
    assert modes == {n: mod.training for n, mod in m.named_modules()}


# ---------------------------------------------------------------------------------------------------------
# paper options and optimizer groups


@pytest.mark.parametrize("norm_affine", ["train", "freeze", "off"])
@pytest.mark.parametrize("freeze_classifier", [False, True])
def test_groups_follow_paper_options(norm_affine, freeze_classifier):
    torch.manual_seed(0)
    cfg = ModelConfig(arch="fmnist_resnet", norm_affine=norm_affine, freeze_classifier=freeze_classifier)
    m = build_model(cfg)
    groups, r = param_groups(m, example_input(cfg), lr=0.1, weight_decay=5e-4, plain_weight_decay=0.0,
                             check="grouped")
    convs = set(_convs(m))
    name_of = {id(p): n for n, p in m.named_parameters()}
    by_name = {g["name"]: {name_of[id(p)] for p in g["params"]} for g in groups}
    assert by_name["scale_invariant"] == convs
    inv = next(g for g in groups if g["scale_invariant"])
    assert inv["weight_decay"] == 5e-4 and inv["lr"] == 0.1
    plain_expected = set()
    if norm_affine == "train":
        plain_expected |= {n for n, _ in m.named_parameters() if ".bn" in n or "downsample.1" in n or n.startswith("bn1")}
    if not freeze_classifier:
        plain_expected |= {"fc.weight", "fc.bias"}
    if plain_expected:
        plain = next(g for g in groups if not g["scale_invariant"])
        assert by_name["plain"] == plain_expected and plain["weight_decay"] == 0.0
    else:
        assert [g["name"] for g in groups] == ["scale_invariant"]
    # every trainable param exactly once, frozen ones nowhere
    listed = [name_of[id(p)] for g in groups for p in g["params"]]
    assert sorted(listed) == sorted(n for n, p in m.named_parameters() if p.requires_grad)
    assert len(r.names("frozen")) == (2 if freeze_classifier else 0) + (18 if norm_affine == "freeze" else 0)
    torch.optim.SGD(groups, lr=0.1)   # well-formed param groups


def test_per_set_groups_and_bad_granularity():
    torch.manual_seed(0)
    cfg = ModelConfig(arch="preact_resnet32")
    m = build_model(cfg)
    groups, r = param_groups(m, example_input(cfg, res=16), lr=0.1, weight_decay=1e-4, granularity="per_set",
                             check="grouped")
    inv = [g for g in groups if g["scale_invariant"]]
    assert len(inv) == 18 and len(groups) == 19
    assert groups[-1]["name"] == "plain" and groups[-1]["weight_decay"] == 1e-4
    assert inv[0]["name"] == "scale_invariant/conv1" and len(inv[0]["params"]) == 6
    with pytest.raises(ValueError, match="granularity"):
        param_groups(m, None, lr=0.1, weight_decay=1e-4, granularity="layer", check=False)


# ---------------------------------------------------------------------------------------------------------
# eps: the only thing that breaks invariance


def test_bn_eps_gap_single_layer_closed_form():
    """conv -> BN(eps=1e-5), float64: scaling the conv by c equals dividing eps by c^2, so BN's output is
    multiplied per channel by r_k = sqrt((var_k + eps) / (var_k + eps / c^2)). Hence the relative change of
    the BN output is between min_k(r_k - 1) and max_k(r_k - 1), and each is ~ eps (1 - 1/c^2) / (2 var_k)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 6, 3, bias=False).double()
    bn = nn.BatchNorm2d(6, affine=False).double()   # default eps 1e-5
    x = torch.randn(8, 3, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        conv.weight[0] *= 0.01        # one low-variance channel: where eps bites hardest
        z = conv(x)
        var = z.var(dim=(0, 2, 3), unbiased=False)
        y0 = bn(z)
        y1 = bn(C * z)
    r = torch.sqrt((var + 1e-5) / (var + 1e-5 / C**2))
    rel = ((y1 - y0).norm() / y0.norm()).item()
    assert (r.min() - 1).item() * (1 - 1e-9) <= rel <= (r.max() - 1).item() * (1 + 1e-9)
    torch.testing.assert_close(y1, y0 * r.view(1, -1, 1, 1), rtol=1e-12, atol=1e-12)
    # first order in eps / var where that is small (not for the low-variance channel 0: eps/var ~ 0.1 there)
    first_order = 1e-5 * (1 - 1 / C**2) / (2 * var)
    assert (1e-5 / var[1:]).max() < 1e-3
    torch.testing.assert_close(r[1:] - 1, first_order[1:], rtol=1e-2, atol=0)


def test_bn_eps_gap_whole_network():
    """fmnist_resnet, float64, default eps 1e-5. The raw per-set gap ||f(cW) - f(W)|| / ||f(W)|| is the eps
    effect: bounded by tol (measured max ~1e-5 here; the per-BN factor is eps/(2 var) ~ 5e-6 with var ~ 1 at
    He init, amplified a few times downstream), proportional to eps (x100 eps -> ~x100 gap), and gone when
    eps is compensated (the check's identity, exact to float64 round-off)."""
    gaps = {}
    for eps in (1e-5, 1e-7):
        torch.manual_seed(0)
        cfg = ModelConfig(arch="fmnist_resnet", bn_eps=eps, channels_last=False)
        m = build_model(cfg).double()
        r = find_scale_invariant(m, example_input(cfg, batch=8, dtype=torch.float64), eps_gap=True)
        assert len(r.invariant_sets) == 9
        for s in r.invariant_sets:
            assert s.rel_change <= 1e-12, (s.name, s.rel_change)   # eps-compensated: pure round-off
        gaps[eps] = [s.eps_gap for s in r.invariant_sets]
    assert max(gaps[1e-5]) <= 1e-3
    assert max(gaps[1e-5]) >= 1e-7    # the gap is real at the default eps, not an artefact of a dead test
    for g5, g7 in zip(gaps[1e-5], gaps[1e-7]):
        assert 50 <= g5 / g7 <= 200, (g5, g7)   # first order in eps


# ---------------------------------------------------------------------------------------------------------
# running-stats rescaling on renormalisation


def _train_a_bit(m, x, steps=3):
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    m.train()
    for _ in range(steps):
        opt.zero_grad()
        out = m(x)
        F.cross_entropy(out, torch.arange(x.shape[0]) % out.shape[1]).backward()
        opt.step()


@pytest.mark.parametrize("arch,granularity", [("fmnist_resnet", "joint"), ("preact_resnet32", "per_set")])
def test_running_stats_rescaler(arch, granularity):
    """Divide each invariant group's weights by c, call the hook: eval outputs are unchanged. With eps=1e-12 the
    only residue is eps * c^2 / var ~ 1e-10 relative, so 1e-6 is a float64 bound with margin. Without the hook
    the eval outputs move at the O(1) level, so the test cannot pass by accident."""
    torch.manual_seed(0)
    # width 8: the rescaling bookkeeping does not depend on width, and float64 convs are slow on CPU
    cfg = ModelConfig(arch=arch, bn_eps=1e-12, channels_last=False, width=8)
    m = build_model(cfg).double()
    x = example_input(cfg, batch=4 if arch == "preact_resnet32" else 8, res=16, dtype=torch.float64)
    _train_a_bit(m, x, steps=2)
    groups, r = param_groups(m, x, lr=0.1, weight_decay=1e-4, granularity=granularity, check="grouped")
    rescale = running_stats_rescaler(m, r, groups)
    m.eval()
    with torch.no_grad():
        y0 = m(x)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    for renorm_hook in (False, True):
        m.load_state_dict(state)
        for gi, g in enumerate(groups):
            if not g["scale_invariant"]:
                continue
            c = 2.0 + 0.37 * gi    # a different c per group
            with torch.no_grad():
                for p in g["params"]:
                    p.div_(c)
            if renorm_hook:
                rescale(gi, c)
        with torch.no_grad():
            y1 = m(x)
        rel = ((y1 - y0).norm() / y0.norm()).item()
        if renorm_hook:
            assert rel <= 1e-6, rel
        else:
            assert rel > 1e-2, rel
    rescale(len(groups) - 1, 2.0)   # the plain group: a no-op


def test_rescaler_degree_two():
    """conv1 -> relu -> conv2 -> BN in ONE joint group: dividing both by c divides the BN input by c^2, so
    running_var must be divided by c^4."""
    torch.manual_seed(0)
    m = _ConvConvBN(bias2=False).double()
    m.bn.eps = 1e-12
    x = torch.randn(8, 3, 6, 6, dtype=torch.float64)
    _train_a_bit(m, x)
    groups, r = param_groups(m, x, lr=0.1, weight_decay=1e-4)
    assert [n.degree for s in r.invariant_sets for n in s.norms] == [1, 1]
    rescale = running_stats_rescaler(m, r, groups)
    m.eval()
    with torch.no_grad():
        y0 = m(x)
        for p in groups[0]["params"]:
            p.div_(3.0)
    rv = m.bn.running_var.clone()
    rescale(0, 3.0)
    torch.testing.assert_close(m.bn.running_var, rv / 81.0, rtol=1e-15, atol=0)
    with torch.no_grad():
        assert ((m(x) - y0).norm() / y0.norm()).item() <= 1e-6


def test_rescaler_rejects_partial_sets():
    torch.manual_seed(0)
    cfg = ModelConfig(arch="preact_resnet32")
    m = build_model(cfg)
    r = find_scale_invariant(m, None, check=False)
    bad = [{"params": [m.conv1.weight], "scale_invariant": True, "name": "half a stream"}]
    with pytest.raises(ValueError, match="whole sets"):
        running_stats_rescaler(m, r, bad)
    with pytest.raises(ValueError, match="not scale invariant"):
        running_stats_rescaler(m, r, [{"params": [m.fc.weight], "scale_invariant": True}])
