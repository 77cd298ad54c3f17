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


def _exact_copy(model: nn.Module) -> nn.Module:
    """float64, norm eps 1e-20, every dropout / stochastic depth / attention dropout switched off."""
    m = copy.deepcopy(model).double()
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
