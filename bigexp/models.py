"""Model builders: the paper's pre-activation ResNet-32, a small Fashion-MNIST ResNet, and any torchvision
classification model (`torchvision.models.list_models(module=torchvision.models)`: ResNet-50/18, ViT, ConvNeXt, ...),
always with random weights (nothing is ever downloaded).

Every architecture is built from a `ModelConfig` and honours the paper's options:
  freeze_classifier   the final Linear keeps its random init (requires_grad False), so it drops out of every
                      optimizer group; the network up to the classifier is then scale invariant end to end.
  norm_affine         train: gamma/beta train as usual; freeze: kept at init (1, 0) with requires_grad False;
                      off: the norm layers have no affine parameters at all (affine=False).
  bn_eps              BatchNorm eps; a non-zero eps is the only thing that breaks exact scale invariance
                      (BN(c x) = (x - mu) / sqrt(var + eps / c^2)). Set on every BatchNorm after construction;
                      LayerNorm keeps the family's own eps (ConvNeXt, ViT: 1e-6).
  zero_init_residual  the bigexp nets and torchvision's ResNet family (resnet*, resnext*, wide_resnet*) only.

Which weights are scale invariant is NOT decided here: `bigexp.optim.invariance` finds it from the traced graph.
"""
from __future__ import annotations

import difflib
import functools
from typing import Callable, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models.resnet import BasicBlock

from bigexp.config.schema import BIGEXP_ARCHS, ModelConfig
from bigexp.errors import ConfigError

ARCHS = BIGEXP_ARCHS   # the architectures bigexp defines or ships tuned configs for (schema.py is their home)

# Input resolution (px) each architecture is meant for; used by `example_input` when no res is given.
# Small rather than 224 px so a forward is cheap enough for tests and the invariance check, while the last
# BatchNorm stage still sees 2x2 positions per image (BatchNorm needs >1 value per channel):
DEFAULT_RES = {"resnet50": 64, "resnet18": 64, "preact_resnet32": 32, "fmnist_resnet": 32}
# ... and per torchvision family, by name prefix (first match; measured, tests/test_torchvision_models.py):
# 32x-downsampling CNNs 64 px; VGG (last BN stage at 1/16) 32; ConvNeXt (LayerNorm, no batch statistics) 32;
# ViT and MaxViT are built for a fixed 224 px; Inception-v3 needs >= 75 px and reaches 2x2 at 107.
_FAMILY_RES = (("vgg", 32), ("convnext", 32), ("vit_", 224), ("maxvit", 224), ("inception", 107),
               ("alexnet", 64), ("", 64))
# googlenet / inception_v3 default to auxiliary heads that make train-mode forward return a tuple; bigexp's
# loss wants logits, and their FutureWarning about init is silenced by asking for it explicitly.
_TV_KWARGS = {"googlenet": {"aux_logits": False, "init_weights": True},
              "inception_v3": {"aux_logits": False, "init_weights": True}}

NormFactory = Callable[[int], nn.Module]


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False)


def _init_weights(model: nn.Module) -> None:
    """He init for convs (as torchvision does), unit gamma / zero beta for norms."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class PreActBlock(nn.Module):
    """Pre-activation basic block (He et al. 2016, "Identity mappings"): BN-ReLU-conv-BN-ReLU-conv + shortcut.

    The projection shortcut reads the *pre-activated* input relu(bn1(x)), not x. That choice matters for
    scale invariance: the shortcut's output is then degree 1 in its own weight only, exactly like conv2's, so
    the residual stream of a stage (shortcut/stem conv + every block's conv2) is jointly scale invariant. A
    shortcut on the raw x would be degree 2 in (stream, shortcut) against degree 1 for conv2, and no uniform
    scaling of the stage's weights would leave the loss unchanged.
    """

    def __init__(self, cin: int, cout: int, stride: int, norm: NormFactory):
        super().__init__()
        self.bn1 = norm(cin)
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn2 = norm(cout)
        self.conv2 = _conv3x3(cout, cout)
        self.shortcut = _conv1x1(cin, cout, stride) if (stride != 1 or cin != cout) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    """Pre-activation ResNet for 32 px input: stem conv, 3 stages of `blocks` pre-act basic blocks with widths
    w, 2w, 4w (strides 1, 2, 2), then BN-ReLU-global-avg-pool-fc. blocks=5 is ResNet-32 (6*5 + 2 layers)."""

    def __init__(self, num_classes: int, width: int, blocks: int, norm: NormFactory):
        super().__init__()
        w = width
        self.conv1 = _conv3x3(3, w)
        layers, cin = [], w
        for cout, stride in ((w, 1), (2 * w, 2), (4 * w, 2)):
            stage = []
            for i in range(blocks):
                stage.append(PreActBlock(cin, cout, stride if i == 0 else 1, norm))
                cin = cout
            layers.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3 = layers
        self.bn = norm(4 * w)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * w, num_classes)
        _init_weights(self)

    def residual_end_norms(self):
        """The last norm inside each residual branch (what zero_init_residual zeroes)."""
        return [b.bn2 for layer in (self.layer1, self.layer2, self.layer3) for b in layer]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.layer3(self.layer2(self.layer1(x)))
        x = F.relu(self.bn(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class FMNISTResNet(nn.Module):
    """Small post-activation ResNet for 28-32 px, 3-channel Fashion-MNIST.

    stem conv3x3(3->w)-BN-ReLU (no max-pool), then 3 stages of `blocks` torchvision BasicBlocks (conv-BN-ReLU-
    conv-BN + shortcut, ReLU) with widths w, 2w, 4w and strides 1, 2, 2 (projection shortcut conv1x1-BN), then
    global-avg-pool-fc. With w=16, blocks=1 at 32 px: 25.0 MFLOPs forward per image (2 FLOPs per MAC) and
    78,042 parameters (num_classes=10); see tests/test_models.py which measures both. Measured: 92.6% test
    accuracy after 6 epochs (SGD momentum 0.9 nesterov, one-cycle LR peak 0.2, batch 128, wd 5e-4 on conv/fc
    weights, horizontal flips, 32 px bilinear resize; 91.4% after 4), ~60-300 s per epoch on one CPU thread.
    """

    def __init__(self, num_classes: int, width: int, blocks: int, norm: NormFactory):
        super().__init__()
        w = width
        self.conv1 = _conv3x3(3, w)
        self.bn1 = norm(w)
        self.relu = nn.ReLU(inplace=True)
        layers, cin = [], w
        for cout, stride in ((w, 1), (2 * w, 2), (4 * w, 2)):
            stage = []
            for i in range(blocks):
                s = stride if i == 0 else 1
                down = None
                if s != 1 or cin != cout:
                    down = nn.Sequential(_conv1x1(cin, cout, s), norm(cout))
                stage.append(BasicBlock(cin, cout, s, down, norm_layer=norm))
                cin = cout
            layers.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * w, num_classes)
        _init_weights(self)

    def residual_end_norms(self):
        return [b.bn2 for layer in (self.layer1, self.layer2, self.layer3) for b in layer]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _norm_modules(model: nn.Module):
    norm_types = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)
    return [m for m in model.modules() if isinstance(m, norm_types)]


def _apply_norm_affine(model: nn.Module, mode: str) -> None:
    for m in _norm_modules(model):
        if getattr(m, "weight", None) is None:
            continue
        if mode == "freeze":
            m.weight.requires_grad_(False)
            m.bias.requires_grad_(False)
        elif mode == "off":
            # Equivalent to constructing with affine=False (torchvision's init loop needs the weights to exist,
            # so they are removed after construction). forward() passes weight=None, bias=None to F.batch_norm.
            m.weight = None
            m.bias = None
            if hasattr(m, "affine"):
                m.affine = False
            if hasattr(m, "elementwise_affine"):
                m.elementwise_affine = False


def torchvision_archs() -> list:
    """torchvision's classification model names (torchvision.models.list_models(module=torchvision.models))."""
    return torchvision.models.list_models(module=torchvision.models)


def arch_error(name) -> Optional[str]:
    """None when `name` is a bigexp net or a torchvision classification model, else why not (with a
    did-you-mean); `bigexp.config.validate` prefixes it with the key, value and source."""
    if name in ARCHS:
        return None
    names = torchvision_archs()
    if name in names:
        return None
    close = difflib.get_close_matches(str(name), list(ARCHS) + names, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]}? " if close else ""
    return (f"unknown architecture; {hint}choose one of {', '.join(ARCHS)}, or any torchvision classification "
            f"model (torchvision.models.list_models(module=torchvision.models): {len(names)} names)")


def _is_tv_resnet(arch: str) -> bool:
    """torchvision's ResNet class (resnet*, resnext*, wide_resnet*): the one family with zero_init_residual."""
    return arch not in ("preact_resnet32", "fmnist_resnet") and \
        torchvision.models.get_model_builder(arch).__module__ == "torchvision.models.resnet"


def _check(cfg: ModelConfig) -> None:
    """The model section's rules, for a ModelConfig that never went through `bigexp.config.validate` (tests, bench);
    a ConfigError (a ValueError) names the key."""
    err = arch_error(cfg.arch)
    if err is not None:
        raise ConfigError(f"model.arch = {cfg.arch!r}: {err}")
    if cfg.norm_affine not in ("train", "freeze", "off"):
        raise ConfigError(f"model.norm_affine: {cfg.norm_affine!r} is not one of train | freeze | off")
    if cfg.zero_init_residual and cfg.norm_affine != "train":
        raise ConfigError(
            f"model.zero_init_residual needs model.norm_affine=train (got {cfg.norm_affine!r}): the zeroed gamma "
            "would be frozen at 0 (or not exist), switching every residual branch off for good")
    if cfg.zero_init_residual and cfg.arch not in ("preact_resnet32", "fmnist_resnet") and not _is_tv_resnet(cfg.arch):
        raise ConfigError(f"model.zero_init_residual: torchvision's {cfg.arch} has no such option (only the ResNet "
                          "family resnet*/resnext*/wide_resnet* and the bigexp nets); set it to false")
    for key in ("num_classes", "width"):
        if int(getattr(cfg, key)) <= 0:
            raise ConfigError(f"model.{key}: must be > 0, got {getattr(cfg, key)!r}")
    if not cfg.bn_eps > 0:
        raise ConfigError(f"model.bn_eps: must be > 0, got {cfg.bn_eps!r}")


def classifier_layer(model: nn.Module) -> nn.Module:
    """The final classifier: the last nn.Linear in module order (every torchvision classification model but
    SqueezeNet, whose documented head is the last conv of `model.classifier`)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if linears:
        return linears[-1]
    head = getattr(model, "classifier", None)
    convs = [m for m in head.modules() if isinstance(m, nn.Conv2d)] if isinstance(head, nn.Module) else []
    if convs:
        return convs[-1]
    raise ConfigError(f"model.freeze_classifier: {type(model).__name__} has no nn.Linear and no classifier conv")


def build_model(cfg: ModelConfig) -> nn.Module:
    """Build the network described by `cfg` (no pretrained weights are ever downloaded).

    Output: logits of shape (batch, cfg.num_classes) for input (batch, 3, H, W): H = W >= 32 for the small nets
    (28 works too) and the torchvision ResNets; `example_input`'s default res for other torchvision families
    (ViT and MaxViT: exactly 224). Seed torch before calling for a reproducible init.
    """
    _check(cfg)
    if cfg.arch in ("preact_resnet32", "fmnist_resnet"):
        norm = functools.partial(nn.BatchNorm2d, eps=cfg.bn_eps)
        net = PreActResNet if cfg.arch == "preact_resnet32" else FMNISTResNet
        model = net(cfg.num_classes, cfg.width, blocks=5 if cfg.arch == "preact_resnet32" else 1, norm=norm)
        if cfg.zero_init_residual:
            for bn in model.residual_end_norms():
                nn.init.zeros_(bn.weight)
    else:
        kwargs = dict(_TV_KWARGS.get(cfg.arch, {}))
        if cfg.zero_init_residual:
            kwargs["zero_init_residual"] = True
        model = torchvision.models.get_model(cfg.arch, weights=None, num_classes=cfg.num_classes, **kwargs)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eps = cfg.bn_eps
    _apply_norm_affine(model, cfg.norm_affine)
    if cfg.freeze_classifier:
        for p in classifier_layer(model).parameters():
            p.requires_grad_(False)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def default_res(arch: str) -> int:
    """`example_input`'s resolution (px) for `arch` (see DEFAULT_RES and _FAMILY_RES)."""
    if arch in DEFAULT_RES:
        return DEFAULT_RES[arch]
    return next(res for prefix, res in _FAMILY_RES if arch.startswith(prefix))


def example_input(cfg_or_arch: Union[ModelConfig, str], batch: int = 4, res: int | None = None,
                  *, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    """A small deterministic normal-noise input (batch, 3, res, res) for tracing, invariance checks and tests.

    res defaults to `default_res(arch)` (px). Channels-last when a ModelConfig with channels_last=True is given.
    batch >= 2 is needed for BatchNorm in train mode (batch statistics); 4 or more is safer.
    """
    arch = cfg_or_arch.arch if isinstance(cfg_or_arch, ModelConfig) else str(cfg_or_arch)
    err = arch_error(arch)
    if err is not None:
        raise ConfigError(f"model.arch = {arch!r}: {err}")
    res = default_res(arch) if res is None else int(res)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, res, res, generator=g, dtype=dtype)
    if isinstance(cfg_or_arch, ModelConfig) and cfg_or_arch.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def forward_flops(model: nn.Module, x: torch.Tensor) -> float:
    """Forward FLOPs per input item (2 FLOPs per multiply-add; convs and matmuls, as torch's FlopCounterMode
    counts them), measured on `x` in eval mode with gradients off."""

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            model(x)
    finally:
        model.train(was_training)
    return fc.get_total_flops() / x.shape[0]


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
