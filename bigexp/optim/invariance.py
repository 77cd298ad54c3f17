"""Automatic scale-invariance detection: which weights can be scaled without changing the loss.

Li & Arora's equivalence (weight decay + SGD == exponential LR without weight decay) holds only for parameter
sets W with L(c W) = L(W) for every c > 0. This module finds those sets from the traced graph, never from layer
names, and then confirms each one numerically.

Graph analysis (torch.fx symbolic trace). Every trainable conv/linear weight is a *root* (its bias joins the
same root: conv(x; cW, cb) = c conv(x; W, b) only when both scale). Every tensor in the graph gets a *label*: a
map root -> integer degree d, meaning "scaling that root's set by c > 0 multiplies this tensor by c^d"; roots not
in the label leave it unchanged. Labels are propagated in graph order:
  - degree-preserving ops (relu, leaky_relu, pooling, flatten, view/reshape, dropout, identity, getitem,
    mean/sum, ...) pass the label through; all of them are positively homogeneous of degree 1;
  - products (mul, matmul, the conv/linear itself) add degrees; a division subtracts the divisor's;
  - sums (add, sub, cat, stack, a layer's bias) need every operand to have the same degree in every root.
    Roots whose degrees differ are merged into ONE joint set (union-find): a residual add x + f(x) only scales
    when the stream's weights and the branch's last weights scale together. If the merged degrees still differ
    (an un-normalised operand, a constant, degree 2 against degree 1) the merged set is plain;
  - a norm layer (BatchNorm/GroupNorm/LayerNorm/InstanceNorm/RMSNorm, module or functional) *absorbs* its
    input: any positive scale of its input leaves its output unchanged (up to eps), so its output is clean;
  - reaching the model output, or entering an op the detector does not model, makes the roots plain.
Norm affine parameters (gamma, beta) are always plain, as in the paper, even where they happen to be jointly
invariant (a BN's gamma and beta feeding another norm through ReLU and a conv): plain SGD with weight decay is
valid for any parameter, so being conservative costs nothing but the exponential-LR form for those few.
Likewise a bias just before a BatchNorm is removed by the mean subtraction, but the detector does not use that:
a conv whose output meets such a bias without a norm in between is reported plain (the numeric check then notes
that it did not move).
A set is scale invariant when it was absorbed somewhere and never made plain. Frozen parameters
(requires_grad False) are constants: the optimizer never scales them.

Numeric check. Each set is then scaled by c (default 3.7) and the train-mode output (batch statistics) compared
with the unscaled one; a graph-invariant set whose relative change exceeds `tol` is demoted to plain. Weights,
buffers (running stats, counters) and train/eval flags are restored exactly afterwards.

The one thing that breaks invariance is the norm layers' eps: BN(c x; eps) = BN(x; eps / c^2) exactly. Its effect
on the output is ~ eps / (2 var) at the norm, times however much the network downstream amplifies it (a
ResNet-50 at init amplifies ~20x: gaps near 1e-3 at tol 1e-3 on a tiny batch). A check that mixed that in would
demote sets at random, so the deciding check compares f(c W; eps * c^(2d)) with f(W; eps) at the absorbing norm
modules, an identity in exact arithmetic: what is left is round-off, or a wrong graph claim. The raw gap
f(c W; eps) vs f(W; eps) is measured too (`eps_gap`; per set when asked, always for all sets at once).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.fx as fx
import torch.nn as nn

# ---------------------------------------------------------------------------------------------------------
# op tables. Functions/methods are matched by their __name__ with underscores trimmed (in-place variants such
# as relu_ and boolean-dispatch wrappers such as _max_pool2d map to the same entry). These are OP names, not
# layer names: which parameters are invariant is decided by the graph structure alone.

_NORM_MODULES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)
if hasattr(nn, "RMSNorm"):
    _NORM_MODULES = _NORM_MODULES + (nn.RMSNorm,)
_SOURCE_MODULES = (nn.modules.conv._ConvNd, nn.Linear)
# Leaf modules that are positively homogeneous of degree 1 in their (single) input.
_UNARY_MODULES = (
    nn.ReLU, nn.LeakyReLU, nn.Identity, nn.Flatten, nn.Unflatten,
    nn.modules.dropout._DropoutNd,
    nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle,
)

_NORM_FUNCS = {"batch_norm", "group_norm", "layer_norm", "instance_norm", "rms_norm"}
_UNARY_FUNCS = {
    "relu", "leaky_relu", "threshold_relu",
    "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
    "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
    "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d",
    "max_pool1d_with_indices", "max_pool2d_with_indices", "max_pool3d_with_indices",
    "adaptive_max_pool1d_with_indices", "adaptive_max_pool2d_with_indices", "adaptive_max_pool3d_with_indices",
    "flatten", "unflatten", "reshape", "view", "view_as", "permute", "transpose", "t", "contiguous", "squeeze",
    "unsqueeze", "expand", "expand_as", "repeat", "clone", "detach", "to", "float", "double", "half", "bfloat16",
    "type_as", "getitem", "chunk", "split", "unbind", "narrow", "select", "roll", "flip", "mean", "sum",
    "neg", "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout",
    "pixel_shuffle", "pixel_unshuffle", "channel_shuffle", "identity", "movedim", "swapaxes",
}
_SUM_FUNCS = {"add", "iadd", "sub", "isub", "cat", "concat", "concatenate", "stack", "hstack", "vstack"}
_PRODUCT_FUNCS = {"mul", "imul", "matmul", "mm", "bmm", "einsum", "outer"}
_DIV_FUNCS = {"truediv", "itruediv", "div"}
_SHAPE_FUNCS = {"size", "dim", "numel", "len"}
_SHAPE_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda", "requires_grad"}
_LINEAR_FUNCS = {"conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "linear"}


def _fname(target) -> str:
    name = target if isinstance(target, str) else getattr(target, "__name__", str(target))
    return name.strip("_")


# ---------------------------------------------------------------------------------------------------------
# report


@dataclass
class NormUse:
    """One norm layer absorbing a set: the set's scaling multiplies this layer's input by c**degree."""
    name: str                      # module qualified name, or the fx node name for a functional norm
    kind: str                      # BatchNorm2d, GroupNorm, batch_norm, ...
    degree: int
    running_mean: Optional[str]    # qualified buffer names (BatchNorm with running stats), else None
    running_var: Optional[str]
    module: bool = True            # False for a functional norm (its eps cannot be compensated in the check)

    def describe(self) -> str:
        return f"{self.kind} {self.name}" + ("" if self.degree == 1 else f" (degree {self.degree})")


@dataclass
class ParamSet:
    """Parameters that must be scaled together (one union-find class)."""
    index: int
    params: list                   # canonical parameter names, model order
    invariant: bool
    reason: str
    layers: list                   # layers (module names) whose weights are in the set
    norms: list = field(default_factory=list)        # NormUse, for invariant sets
    joint: bool = False            # merged through sums (residual adds, cat, ...)
    rel_change: Optional[float] = None   # numeric check: ||f(cW; eps c^2d) - f(W; eps)|| / ||f(W; eps)||
    eps_gap: Optional[float] = None      # raw: ||f(cW; eps) - f(W; eps)|| / ||f(W; eps)|| (when measured)

    @property
    def name(self) -> str:
        return self.layers[0] if self.layers else self.params[0]


@dataclass
class ParamEntry:
    name: str
    shape: tuple
    numel: int
    status: str                    # "invariant" | "plain" | "frozen"
    set_index: Optional[int]       # the ParamSet it belongs to (None: norm affine, frozen, unused, ...)
    reason: str
    rel_change: Optional[float]

    @property
    def group(self) -> str:
        return f"set {self.set_index}" if self.status == "invariant" else self.status


@dataclass
class InvarianceReport:
    entries: list                  # ParamEntry for every parameter of the model, model order
    sets: list                     # ParamSet, every set (invariant and plain)
    scale: float
    tol: float
    checked: object                # True (per set), "grouped", or False (graph only)
    union_rel_change: Optional[float] = None   # all invariant sets scaled by the same c at once (eps-compensated)
    union_eps_gap: Optional[float] = None      # the same, raw (with the norms' real eps)

    def entry(self, name: str) -> ParamEntry:
        for e in self.entries:
            if e.name == name:
                return e
        raise KeyError(f"no parameter named {name!r} in the report")

    def names(self, status: str) -> list:
        return [e.name for e in self.entries if e.status == status]

    @property
    def invariant_sets(self) -> list:
        return [s for s in self.sets if s.invariant]

    def counts(self) -> dict:
        out = {"invariant": 0, "plain": 0, "frozen": 0}
        for e in self.entries:
            out[e.status] += 1
        out["invariant_sets"] = len(self.invariant_sets)
        out["joint_sets"] = sum(1 for s in self.invariant_sets if s.joint)
        out["invariant_numel"] = sum(e.numel for e in self.entries if e.status == "invariant")
        return out

    def to_dict(self) -> dict:
        return {
            "scale": self.scale, "tol": self.tol, "checked": self.checked,
            "union_rel_change": self.union_rel_change, "union_eps_gap": self.union_eps_gap,
            "counts": self.counts(),
            "params": [{"name": e.name, "shape": list(e.shape), "status": e.status, "set": e.set_index,
                        "reason": e.reason, "rel_change": e.rel_change} for e in self.entries],
            "sets": [{"index": s.index, "params": list(s.params), "invariant": s.invariant, "joint": s.joint,
                      "reason": s.reason, "rel_change": s.rel_change, "eps_gap": s.eps_gap,
                      "norms": [{"name": n.name, "kind": n.kind, "degree": n.degree} for n in s.norms]}
                     for s in self.sets],
        }

    def format(self) -> str:
        def rc(v):
            return "-" if v is None else f"{v:.1e}"
        rows = [(e.name, "x".join(map(str, e.shape)) or "scalar", e.group, rc(e.rel_change), e.reason)
                for e in self.entries]
        head = ("parameter", "shape", "group", "rel.change", "why")
        w = [max(len(str(r[i])) for r in rows + [head]) for i in range(4)]
        lines = ["  ".join(str(v).ljust(w[i]) for i, v in enumerate(head[:4])) + "  " + head[4]]
        lines += ["  ".join(str(v).ljust(w[i]) for i, v in enumerate(r[:4])) + "  " + r[4] for r in rows]
        c = self.counts()
        lines.append(
            f"{c['invariant']} invariant params in {c['invariant_sets']} sets ({c['joint_sets']} joint, "
            f"{c['invariant_numel']:,} weights), {c['plain']} plain, {c['frozen']} frozen; "
            + (f"numeric check{' (grouped)' if self.checked == 'grouped' else ''}: scale {self.scale}, tol {self.tol:g}, all invariant sets at once: "
               f"{rc(self.union_rel_change)} (with the real eps: {rc(self.union_eps_gap)})" if self.checked else "numeric check skipped"))
        for s in self.invariant_sets:
            norms = ", ".join(n.describe() for n in s.norms)
            lines.append(f"  set {s.index}{' (joint)' if s.joint else ''}: {len(s.params)} params, "
                         f"absorbed by {norms}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# graph analysis


class _Sets:
    """Union-find over roots, carrying each class's members, plain reasons and merge kinds."""

    def __init__(self):
        self.parent: dict = {}
        self.members: dict = {}      # root -> list of param names
        self.layers: dict = {}       # root -> list of layer names
        self.plain: dict = {}        # root -> list of reasons
        self.merges: dict = {}       # root -> set of merge kinds
        self.order: list = []

    def add(self, key: str, params: list, layer: str):
        if key not in self.parent:
            self.parent[key] = key
            self.members[key], self.layers[key] = list(params), [layer]
            self.plain[key], self.merges[key] = [], set()
            self.order.append(key)
        return key

    def find(self, k):
        while self.parent[k] != k:
            self.parent[k] = self.parent[self.parent[k]]
            k = self.parent[k]
        return k

    def union(self, keys, kind: str):
        roots = sorted({self.find(k) for k in keys}, key=self.order.index)
        if len(roots) < 2:
            return roots[0] if roots else None
        r0 = roots[0]
        for r in roots[1:]:
            self.parent[r] = r0
            self.members[r0] += self.members.pop(r)
            self.layers[r0] += self.layers.pop(r)
            self.plain[r0] += self.plain.pop(r)
            self.merges[r0] |= self.merges.pop(r)
        self.merges[r0].add(kind)
        return r0

    def mark_plain(self, keys, reason: str):
        for k in {self.find(k) for k in keys}:
            self.plain[k].append(reason)

    def resolve(self, label: dict) -> dict:
        out: dict = {}
        for k, d in label.items():
            r = self.find(k)
            out[r] = out.get(r, 0) + d
        return {k: d for k, d in out.items() if d != 0}


def _add_labels(labels):
    out: dict = {}
    for lab in labels:
        for k, d in lab.items():
            out[k] = out.get(k, 0) + d
    return {k: d for k, d in out.items() if d != 0}


class _Analysis:
    def __init__(self, model: nn.Module):
        self.model = model
        self.sets = _Sets()
        self.name_of = {id(p): n for n, p in model.named_parameters()}
        self.norm_uses: list = []           # (NormUse without degree, raw label)
        self.affine_of: dict = {}           # param name -> reason (norm affine, opaque module, ...)
        self.labels: dict = {}

    # --- helpers
    def _lab(self, a) -> dict:
        return self.sets.resolve(self.labels.get(a, {})) if isinstance(a, fx.Node) else {}

    def _node_inputs(self, node):
        return list(node.all_input_nodes)

    def _plain_inputs(self, nodes, reason):
        keys = [k for n in nodes for k in self._lab(n)]
        if keys:
            self.sets.mark_plain(keys, reason)

    def _param_root(self, p: nn.Parameter, layer: str, extra=()):
        """The root for a trainable parameter (with trainable companions that scale with it), or None."""
        if p is None or not p.requires_grad:
            return None
        name = self.name_of[id(p)]
        members = [name] + [self.name_of[id(q)] for q in extra if q is not None and q.requires_grad]
        return self.sets.add(name, members, layer)

    def _absorb(self, node, inp, kind: str, name: str, rm=None, rv=None, module=True):
        lab = self._lab(inp)
        if lab:
            self.norm_uses.append((NormUse(name, kind, 0, rm, rv, module), lab))

    # --- main loop
    def run(self, graph: fx.Graph):
        m = self.model
        for node in graph.nodes:
            op, out = node.op, {}
            if op == "get_attr":
                obj = _fetch(m, node.target)
                if isinstance(obj, nn.Parameter) and obj.requires_grad:
                    r = self._param_root(obj, str(node.target))
                    out = {r: 1}
            elif op == "output":
                self._plain_inputs(self._node_inputs(node), "reaches the model output without passing a norm layer")
            elif op == "call_module":
                out = self._module(node, m.get_submodule(node.target))
            elif op in ("call_function", "call_method"):
                out = self._function(node)
            self.labels[node] = out

    def _module(self, node, mod):
        name = str(node.target)
        args = node.args
        if isinstance(mod, _NORM_MODULES):
            rm = f"{name}.running_mean" if getattr(mod, "running_mean", None) is not None else None
            rv = f"{name}.running_var" if getattr(mod, "running_var", None) is not None else None
            self._absorb(node, args[0], type(mod).__name__, name, rm, rv)
            for p in mod.parameters(recurse=False):
                self.affine_of.setdefault(self.name_of[id(p)], f"norm affine of {type(mod).__name__} {name}")
            return {}
        if isinstance(mod, _SOURCE_MODULES):
            w, b = mod.weight, mod.bias
            root = self._param_root(w, name, extra=[b] if b is not None else [])
            prod = _add_labels([self._lab(args[0]), {root: 1} if root else {}])
            if b is None:
                return prod
            broot = root if root is not None else self._param_root(b, name)
            blab = {broot: 1} if (broot is not None and b.requires_grad) else {}
            return self._sum_labels([prod, blab], node, "bias add", f"{type(mod).__name__} {name}")
        if isinstance(mod, _UNARY_MODULES):
            return self._unary(node, args[0] if args else None)
        # A leaf module the detector does not model: nothing flowing through it can be proven invariant.
        self._plain_inputs(self._node_inputs(node), f"passes through {type(mod).__name__} {name}, "
                                                     "which the detector does not model")
        for p in mod.parameters():
            self.affine_of.setdefault(self.name_of[id(p)], f"inside {type(mod).__name__} {name}, "
                                                            "which the detector does not model")
        return {}

    def _sum_labels(self, labs, node, kind, layer=None):
        keys = {k for lab in labs for k in lab}
        bad = {k for k in keys if len({lab.get(k, 0) for lab in labs}) > 1}
        if bad:
            self.sets.union(bad, kind)
            labs = [self.sets.resolve(lab) for lab in labs]
            keys = {k for lab in labs for k in lab}
            bad = {k for k in keys if len({lab.get(k, 0) for lab in labs}) > 1}
            if bad:
                degs = sorted({sum(lab.get(k, 0) for k in bad) for lab in labs})
                if kind == "bias add":
                    why = (f"feeds {layer or node.name} without a norm in between, and its bias makes the output "
                           "not homogeneous")
                else:
                    why = (f"{kind} at {node.name} mixes operands of degree {degs} in this set (an un-normalised "
                           "input, a constant, or a degree mismatch)")
                self.sets.mark_plain(bad, why)
        return labs[0] if labs else {}

    def _unary(self, node, data):
        others = [n for n in self._node_inputs(node) if n is not data]
        self._plain_inputs(others, f"used as a non-data argument of {node.name}")
        return self._lab(data)

    def _function(self, node):
        name = _fname(node.target)
        args, kwargs = node.args, node.kwargs
        inputs = self._node_inputs(node)
        if node.op == "call_function" and name == "getattr":
            attr = args[1] if len(args) > 1 else None
            if attr in _SHAPE_ATTRS:
                return {}
            if attr in ("T", "mT", "data"):
                return self._lab(args[0])
        elif name in _SHAPE_FUNCS:
            return {}
        elif name in _NORM_FUNCS:
            data = args[0] if args else kwargs.get("input")
            rm = rv = None
            if name == "batch_norm":
                rm_n = args[1] if len(args) > 1 else kwargs.get("running_mean")
                rv_n = args[2] if len(args) > 2 else kwargs.get("running_var")
                rm = str(rm_n.target) if isinstance(rm_n, fx.Node) and rm_n.op == "get_attr" else None
                rv = str(rv_n.target) if isinstance(rv_n, fx.Node) and rv_n.op == "get_attr" else None
            self._absorb(node, data, name, node.name, rm, rv, module=False)
            for a in inputs:
                if a is data:
                    continue
                if a.op == "get_attr":
                    obj = _fetch(self.model, a.target)
                    if isinstance(obj, nn.Parameter):
                        self.affine_of.setdefault(self.name_of[id(obj)], f"norm affine of {name} {node.name}")
            self._plain_inputs([a for a in inputs if a is not data], f"norm affine of {name} {node.name}")
            return {}
        elif name in _UNARY_FUNCS:
            data = args[0] if args else next(iter(kwargs.values()), None)
            return self._unary(node, data if isinstance(data, fx.Node) else None)
        elif name in ("pad",):
            value = kwargs.get("value", args[3] if len(args) > 3 else 0) or 0
            mode = kwargs.get("mode", args[2] if len(args) > 2 else "constant")
            if mode == "constant" and value == 0:
                return self._unary(node, args[0])
        elif name in ("interpolate", "upsample"):
            mode = kwargs.get("mode", args[3] if len(args) > 3 else "nearest")
            if mode in ("nearest", "linear", "bilinear", "trilinear", "area", "nearest-exact"):
                return self._unary(node, args[0])
        elif name in _SUM_FUNCS:
            operands = list(args[0]) if name not in ("add", "iadd", "sub", "isub") else list(args[:2])
            if name in ("add", "iadd", "sub", "isub"):
                operands += [kwargs[k] for k in ("other",) if k in kwargs]
                # a scalar 0 adds nothing; any other constant is an un-normalised operand
                operands = [o for o in operands if isinstance(o, fx.Node) or o != 0]
            kind = "residual add" if name in ("add", "iadd", "sub", "isub") else "concatenation"
            return self._sum_labels([self._lab(o) if isinstance(o, fx.Node) else {} for o in operands], node, kind)
        elif name in _PRODUCT_FUNCS:
            return _add_labels([self._lab(a) for a in inputs])
        elif name in _DIV_FUNCS:
            num = args[0] if args else None
            den = args[1] if len(args) > 1 else kwargs.get("other")
            lab_n = self._lab(num)
            lab_d = self._lab(den)
            return _add_labels([lab_n, {k: -d for k, d in lab_d.items()}])
        elif name in _LINEAR_FUNCS:
            x = args[0] if args else kwargs.get("input")
            wn = args[1] if len(args) > 1 else kwargs.get("weight")
            bn = args[2] if len(args) > 2 else kwargs.get("bias")
            self._plain_inputs([a for a in inputs if a not in (x, wn, bn)], f"non-data argument of {node.name}")
            prod = _add_labels([self._lab(x), self._lab(wn)])
            if bn is None:
                return prod
            return self._sum_labels([prod, self._lab(bn)], node, "bias add")
        # anything else: not positively homogeneous as far as the detector knows
        self._plain_inputs(inputs, f"passes through {name} ({node.name}), which is not positively homogeneous "
                                   "(or not modelled)")
        return {}


def _fetch(model: nn.Module, target: str):
    obj = model
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


# ---------------------------------------------------------------------------------------------------------
# numeric check


def _flat_tensors(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _flat_tensors(o)]
    return []


class _Probe:
    """Runs train-mode forwards with a fixed RNG state and restores buffers after each one."""

    def __init__(self, model: nn.Module, x):
        self.model, self.x = model, x
        self.buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
        self.modes = {n: mod.training for n, mod in model.named_modules()}

    def forward(self) -> torch.Tensor:
        m = self.model
        devices = [self.x.device.index or 0] if self.x.device.type == "cuda" else []
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=devices):
                torch.manual_seed(12345)   # dropout & co. draw the same masks in every probe
                m.train()
                out = _flat_tensors(m(self.x))
        except Exception as e:  # noqa: BLE001 - re-raised with context
            raise RuntimeError(f"invariance check: the train-mode forward on the example input failed ({e}); "
                               "BatchNorm needs a batch of at least 2 (4 or more is safer)") from e
        finally:
            self.restore()
        if not out:
            raise RuntimeError("invariance check: the model returned no tensors")
        return torch.cat([t.detach().reshape(-1).double() for t in out])

    def restore(self):
        bufs = dict(self.model.named_buffers())
        with torch.no_grad():
            for n, b in self.buffers.items():
                bufs[n].copy_(b)
        for n, mod in self.model.named_modules():
            mod.training = self.modes[n]

    def rel_change(self, base: torch.Tensor, scaled: list, eps_factor: Optional[dict] = None) -> float:
        """Relative output change when each (param, c) in `scaled` is multiplied by its c and the norm modules
        in eps_factor (module -> factor) have their eps multiplied by that factor."""
        params = [p for p, _ in scaled]
        saved = [p.detach().clone() for p in params]
        eps_factor = {m: f for m, f in (eps_factor or {}).items() if getattr(m, "eps", None) is not None}
        saved_eps = {m: m.eps for m in eps_factor}
        try:
            with torch.no_grad():
                for p, c in scaled:
                    p.mul_(c)
            for m, f in eps_factor.items():
                m.eps = m.eps * f
            y = self.forward()
        finally:
            with torch.no_grad():
                for p, s in zip(params, saved):
                    p.copy_(s)
            for m, e in saved_eps.items():
                m.eps = e
        denom = base.norm().item()
        diff = (y - base).norm().item()
        if not math.isfinite(diff):
            return math.inf
        return diff / denom if denom > 0 else (0.0 if diff == 0 else math.inf)


# ---------------------------------------------------------------------------------------------------------
# public API


def find_scale_invariant(model: nn.Module, example_input: Optional[torch.Tensor], *, tol: float = 1e-3,
                         check=True, scale: float = 3.7, eps_gap: bool = False) -> InvarianceReport:
    """Find the parameter sets whose joint scaling by any c > 0 leaves the model's output unchanged.

    model:          an nn.Module that torch.fx.symbolic_trace can trace (pass the bare module, not a DeepSpeed
                    engine or DDP wrapper).
    example_input:  a batch (>= 2, better >= 4, for BatchNorm's batch statistics) used by the numeric check; it
                    is moved to the model's device and dtype. May be None when check=False. A bf16/fp16 model
                    is checked on a float32 copy.
    tol:            relative output change (L2 over all outputs, eps-compensated, see the module docstring)
                    above which a graph-invariant set is demoted to plain; > 0. Float32 round-off measures
                    1e-7..1e-4 (deep nets amplify it), so 1e-3 separates it from a wrong claim (O(1) changes).
    scale:          the factor c used by the check; > 0 and != 1.
    check:          True: one forward per set (each set's own relative change); "grouped": all graph-invariant
                    sets in one forward, each scaled by its own c in (scale, scale^2), halving only on failure
                    (each set then reports its batch's change; for big nets on CPU); False: graph only.
    eps_gap:        also measure each set's raw change with the norms' real eps (one more forward per set).
    Returns an InvarianceReport listing every parameter. The model's weights, buffers and train/eval flags are
    left exactly as they were.
    """
    if not tol > 0:
        raise ValueError(f"tol: must be > 0, got {tol!r}")
    if check not in (True, False, "grouped"):
        raise ValueError(f"check: must be True, False or 'grouped', got {check!r}")
    if not (scale > 0 and scale != 1):
        raise ValueError(f"scale: must be > 0 and != 1, got {scale!r}")
    try:
        gm = fx.symbolic_trace(model)
    except Exception as e:  # noqa: BLE001 - re-raised with context
        raise RuntimeError(f"torch.fx could not trace {type(model).__name__} ({type(e).__name__}: {e}); scale "
                           "invariance is only ever decided from the traced graph, so this model cannot be used "
                           "with expsgd (make its forward traceable, or use optim.optimizer=sgd)") from e
    an = _Analysis(model)
    an.run(gm.graph)
    S = an.sets

    # final sets, in order of first appearance
    roots = [r for r in S.order if S.find(r) == r]
    model_order = {n: i for i, (n, _) in enumerate(model.named_parameters())}
    root_index = {r: i for i, r in enumerate(roots)}
    sets = []
    for i, r in enumerate(roots):
        norms = {}
        for use, lab in an.norm_uses:
            d = S.resolve(lab).get(r, 0)
            if d:
                key = (use.name, d)
                norms.setdefault(key, NormUse(use.name, use.kind, d, use.running_mean, use.running_var, use.module))
        params = sorted(S.members[r], key=model_order.__getitem__)
        joint = bool(S.merges[r] - {"bias add"}) and len(S.layers[r]) > 1
        kinds = " and ".join(sorted(S.merges[r] - {"bias add"})) or "sums"
        if S.plain[r]:
            invariant, reason = False, S.plain[r][0]
        elif not norms:
            invariant, reason = False, "never reaches a norm layer (unused output)"
        else:
            invariant = True
            names = [n.describe() for n in norms.values()]
            absorbed = ", ".join(names[:3]) + (f" (+{len(names) - 3} more)" if len(names) > 3 else "")
            reason = f"feeds {absorbed}"
        if joint:
            others = len(S.layers[r]) - 1
            reason = f"joint with {others} other layer{'s' * (others != 1)} through {kinds}; " + reason
        sets.append(ParamSet(i, params, invariant, reason, list(S.layers[r]), list(norms.values()) if invariant
                             else [], joint))

    checked = check
    union_rel = union_gap = None
    if check:
        if example_input is None:
            raise ValueError("example_input: needed for the numeric check (or pass check=False)")
        # bf16/fp16 round-off (~1e-2) would swamp tol: check a float32 copy instead (same names, same graph)
        low = any(p.is_floating_point() and p.dtype in (torch.float16, torch.bfloat16) for p in model.parameters())
        cmodel = copy.deepcopy(model).float() if low else model
        params = dict(cmodel.named_parameters())
        p0 = next(iter(params.values()), None)
        x = example_input.to(device=p0.device if p0 is not None else example_input.device)
        if p0 is not None and x.is_floating_point():
            x = x.to(dtype=p0.dtype)
        probe = _Probe(cmodel, x)
        base = probe.forward()
        def change(scales: dict, compensate: bool = True) -> float:
            """scales: set index -> c. Compensated: each absorbing norm module's eps times prod c^(2 degree)."""
            factor: dict = {}
            for si, c in scales.items():
                for u in (sets[si].norms if compensate else []):
                    if u.module:
                        mod = cmodel.get_submodule(u.name)
                        factor[mod] = factor.get(mod, 1.0) * c ** (2 * u.degree)
            scaled = [(params[n], c) for si, c in scales.items() for n in sets[si].params]
            return probe.rel_change(base, scaled, factor)

        def grouped(idx: list):
            """One forward for the whole batch of sets, each with its own c in (scale, scale^2); split in
            halves only when it fails, so a failing set is still found and measured alone."""
            if len(idx) == 1:
                sets[idx[0]].rel_change = change({idx[0]: scale})
                return
            cs = {si: scale ** (1 + k / len(idx)) for k, si in enumerate(idx)}
            rc = change(cs)
            if rc <= tol:
                for si in idx:
                    sets[si].rel_change = rc
            else:
                grouped(idx[: len(idx) // 2])
                grouped(idx[len(idx) // 2:])

        candidates = [s.index for s in sets if s.invariant]
        if check == "grouped" and candidates:
            grouped(candidates)
        for s in sets:
            if s.rel_change is None:
                s.rel_change = change({s.index: scale})
            if eps_gap and s.invariant:
                s.eps_gap = change({s.index: scale}, compensate=False)
            if s.invariant and not s.rel_change <= tol:
                s.invariant = False
                s.reason = (f"numeric check failed: output changed by {s.rel_change:.2e} > tol {tol:g} when scaled "
                            f"by {scale}, although the graph says: {s.reason}")
                s.norms = []
            elif not s.invariant and s.rel_change <= tol:
                s.reason += f" (numerically unchanged here, {s.rel_change:.1e}, but the graph cannot prove it)"
        inv = {s.index: scale for s in sets if s.invariant}
        if inv:
            union_rel = change(inv)
            union_gap = change(inv, compensate=False)

    set_of = {n: s for s in sets for n in s.params}
    entries = []
    for n, p in model.named_parameters():
        shape, numel = tuple(p.shape), p.numel()
        if not p.requires_grad:
            entries.append(ParamEntry(n, shape, numel, "frozen", None, "frozen (requires_grad=False)", None))
            continue
        s = set_of.get(n)
        if s is None:
            reason = an.affine_of.get(n, "not used in the traced forward")
            entries.append(ParamEntry(n, shape, numel, "plain", None, reason, None))
            continue
        layer = n.rsplit(".", 1)[0] if "." in n else n
        is_bias = n != s.params[0] and n.endswith("bias") and f"{layer}.weight" in s.params
        if is_bias:
            reason = (f"bias of {layer}, scales with its weight" if s.invariant
                      else f"bias of a plain layer ({layer}): {s.reason}")
        else:
            reason = s.reason if s.invariant else f"plain: {s.reason}"
        entries.append(ParamEntry(n, shape, numel, "invariant" if s.invariant else "plain", s.index, reason,
                                  s.rel_change))
    return InvarianceReport(entries, sets, float(scale), float(tol), checked, union_rel, union_gap)


def param_groups(model: nn.Module, example_input: Optional[torch.Tensor], *, lr: float, weight_decay: float,
                 plain_weight_decay: Optional[float] = None, granularity: str = "joint", tol: float = 1e-3,
                 check=True):
    """Optimizer param groups for ExpSGD, and the report they came from.

    granularity "joint": one group `scale_invariant=True` holding every invariant set (scaling each invariant set
    by the same c leaves the loss unchanged, so the union is invariant too); "per_set": one such group per set.
    Everything else that trains (norm affine, biases of plain layers, the classifier, ...) goes into ONE group
    `scale_invariant=False`, name "plain", with weight_decay = plain_weight_decay (default: weight_decay).
    Invariant groups carry weight_decay = the base lambda: ExpSGD turns it into the exponential LR growth instead
    of decaying the weights. Frozen parameters appear in no group. Each group dict has params, lr, weight_decay,
    scale_invariant and name. tol and check are passed to `find_scale_invariant`.
    """
    if granularity not in ("joint", "per_set"):
        raise ValueError(f"granularity: must be 'joint' or 'per_set', got {granularity!r}")
    if not lr > 0:
        raise ValueError(f"lr: must be > 0, got {lr!r}")
    if weight_decay < 0 or (plain_weight_decay is not None and plain_weight_decay < 0):
        raise ValueError("weight_decay / plain_weight_decay: must be >= 0")
    report = find_scale_invariant(model, example_input, tol=tol, check=check)
    params = dict(model.named_parameters())
    groups = []
    inv_sets = report.invariant_sets
    if granularity == "joint" and inv_sets:
        names = [e.name for e in report.entries if e.status == "invariant"]
        groups.append({"params": [params[n] for n in names], "lr": lr, "weight_decay": weight_decay,
                       "scale_invariant": True, "name": "scale_invariant"})
    elif granularity == "per_set":
        for s in inv_sets:
            groups.append({"params": [params[n] for n in s.params], "lr": lr, "weight_decay": weight_decay,
                           "scale_invariant": True, "name": f"scale_invariant/{s.name}"})
    plain = [params[n] for n in report.names("plain")]
    if plain:
        groups.append({"params": plain, "lr": lr,
                       "weight_decay": weight_decay if plain_weight_decay is None else plain_weight_decay,
                       "scale_invariant": False, "name": "plain"})
    return groups, report


def running_stats_rescaler(model: nn.Module, report: InvarianceReport, groups) -> Callable[[int, float], None]:
    """The optimizer's `on_renorm(group_index, c)` hook: after the weights of invariant group `group_index` were
    divided by c (> 0), divide running_mean by c**d and running_var by c**(2d) of every BatchNorm that absorbs the
    group (d: the degree of that norm's input in the group, 1 for a conv feeding it directly), so that eval-mode
    outputs are unchanged up to BN's eps. GroupNorm/LayerNorm keep no running statistics and need nothing.

    groups: the list returned by `param_groups` (or the optimizer's param_groups, same order). A group must hold
    whole sets of the report; plain groups get a no-op.
    """
    name_of = {id(p): n for n, p in model.named_parameters()}
    entry = {e.name: e for e in report.entries}
    buffers = dict(model.named_buffers())
    plans = []
    for gi, g in enumerate(groups):
        if not g.get("scale_invariant", False):
            plans.append([])
            continue
        names = {name_of[id(p)] for p in g["params"]}
        set_ids = set()
        for n in names:
            e = entry.get(n)
            if e is None or e.status != "invariant":
                raise ValueError(f"groups[{gi}] ({g.get('name')}): parameter {n} is not scale invariant in the report")
            set_ids.add(e.set_index)
        for si in set_ids:
            missing = set(report.sets[si].params) - names
            if missing:
                raise ValueError(f"groups[{gi}] ({g.get('name')}): holds part of invariant set {si} but not "
                                 f"{sorted(missing)}; a group must hold whole sets")
        degree: dict = {}
        for si in sorted(set_ids):
            for u in report.sets[si].norms:
                if u.running_mean is None and u.running_var is None:
                    continue
                key = (u.running_mean, u.running_var)
                degree[key] = degree.get(key, 0) + u.degree
        plan = []
        for (rm, rv), d in degree.items():
            plan.append((buffers[rm] if rm else None, buffers[rv] if rv else None, d))
        plans.append(plan)

    def rescale(group_index: int, c: float) -> None:
        if not c > 0:
            raise ValueError(f"running_stats_rescaler: c must be > 0, got {c!r}")
        with torch.no_grad():
            for rm, rv, d in plans[group_index]:
                if rm is not None:
                    rm.div_(c ** d)
                if rv is not None:
                    rv.div_(c ** (2 * d))

    return rescale
