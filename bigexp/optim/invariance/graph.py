"""Graph analysis: which parameter sets a torch.fx trace proves scale invariant, from the structure alone.

Every trainable conv/linear weight is a *root* (its bias joins the same root: conv(x; cW, cb) = c conv(x; W, b)
only when both scale). Every tensor in the graph gets a *label*: a map root -> integer degree d, meaning "scaling
that root's set by c > 0 multiplies this tensor by c^d"; roots not in the label leave it unchanged. Labels are
propagated in graph order:
  - degree-preserving ops (relu, leaky_relu, pooling, flatten, view/reshape, dropout, identity, getitem,
    mean/sum, ...) pass the label through; all of them are positively homogeneous of degree 1;
  - products (mul, matmul, the conv/linear itself) add degrees; a division subtracts the divisor's;
  - sums (add, sub, cat, stack, a layer's bias) need every operand to have the same degree in every root.
    Roots whose degrees differ are merged into ONE joint set (union-find, `unionfind.JointSets`): a residual
    add x + f(x) only scales when the stream's weights and the branch's last weights scale together. If the
    merged degrees still differ (an un-normalised operand, a constant, degree 2 against degree 1) the merged
    set is plain;
  - a norm layer (BatchNorm/GroupNorm/LayerNorm/InstanceNorm/RMSNorm, module or functional) *absorbs* its
    input: any positive scale of its input leaves its output unchanged (up to eps), so its output is clean;
  - reaching the model output, or entering an op the detector does not model, makes the roots plain;
  - nn.MultiheadAttention on clean (normalised) inputs: softmax(QK^T) is not homogeneous, so the packed
    query/key/value projections are plain, but the output is out_proj(...) (weight and bias), degree 1 in it;
    any labelled input makes the roots in it plain (attention on a scaled stream is not modelled).
With `choices=True`, two choices keep a few parameters plain so that more weights can scale (a plain parameter is
a constant here: the optimizer never scales it, so leaving it out of every set is always sound; `find` labels
the graph both ways and keeps the one with more invariant weights):
  - an elementwise gain (a bare parameter multiplying a weighted branch, e.g. ConvNeXt's layer_scale) stays
    plain, so the branch's last weights can scale together with the residual stream they are added to;
  - a conv/linear WITH bias whose input is already scaled (degree 1 in a set S, e.g. ConvNeXt's depthwise conv
    on the stream) keeps its weight plain, and its bias joins S: W (c x) + c b = c (W x + b). Keeping W with b
    instead would merge W into S at degree 2 against 1 and make all of S plain.
and a root already plain is dropped from every label read afterwards: its degree cannot matter, since it is
never scaled, and leaving it in would drag the sets it meets into plain through needless unions.
Norm affine parameters (gamma, beta) are always plain, as in the paper, even where they happen to be jointly
invariant (a BN's gamma and beta feeding another norm through ReLU and a conv): plain SGD with weight decay is
valid for any parameter, so being conservative costs nothing but the exponential-LR form for those few.
Likewise a bias just before a BatchNorm is removed by the mean subtraction, but the detector does not use that:
a conv whose output meets such a bias without a norm in between is reported plain (the numeric check then notes
that it did not move).
A set is scale invariant when it was absorbed somewhere and never made plain. Frozen parameters
(requires_grad False) are constants: the optimizer never scales them.
"""
from __future__ import annotations

import torch.fx as fx
import torch.nn as nn

from bigexp.optim.invariance.report import NormUse
from bigexp.optim.invariance.unionfind import JointSets, add_labels

# ---------------------------------------------------------------------------------------------------------
# op tables. Functions/methods are matched by their __name__ with underscores trimmed (in-place variants such
# as relu_ and boolean-dispatch wrappers such as _max_pool2d map to the same entry). These are OP names, not
# layer names: which parameters are invariant is decided by the graph structure alone.

_NORM_MODULES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)
if hasattr(nn, "RMSNorm"):
    _NORM_MODULES = _NORM_MODULES + (nn.RMSNorm,)
_SOURCE_MODULES = (nn.modules.conv._ConvNd, nn.Linear)
_ATTENTION_MODULES = (nn.MultiheadAttention,)
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
    "stochastic_depth",   # torchvision.ops: input * bernoulli mask / (1 - p), degree 1 in the input
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


class GraphAnalysis:
    """Labels every node of a traced graph (`run`), merging and marking roots in `self.sets` as it goes."""

    def __init__(self, model: nn.Module, choices: bool = False):
        self.model = model
        self.choices = choices
        self.sets = JointSets()
        self.name_of = {id(p): n for n, p in model.named_parameters()}
        self.norm_uses: list = []           # (NormUse without degree, raw label)
        self.affine_of: dict = {}           # param name -> reason (norm affine, opaque module, ...)
        self.labels: dict = {}
        self.lazy: dict = {}                # get_attr node -> parameter whose root is made on first use
        self.constants: set = set()         # trainable params kept out of every set (plain), see module doc
        self.root_key: dict = {}            # param name -> key of the root it was made a member of
        self.tuple_labels: dict = {}        # node returning a tuple -> label of each element

    # --- helpers
    def _lab(self, a) -> dict:
        if not isinstance(a, fx.Node):
            return {}
        if a in self.lazy:
            p = self.lazy.pop(a)
            r = self._param_root(p, str(a.target))
            self.labels[a] = {r: 1} if r is not None else {}
        return self._clean(self.labels.get(a, {}))

    def _clean(self, label: dict) -> dict:
        """`label` over current root keys, without the roots already plain (never scaled: degree irrelevant)."""
        lab = self.sets.resolve(label)
        return {k: d for k, d in lab.items() if not (self.choices and self.sets.plain[k])}

    def _make_constant(self, p: nn.Parameter, reason: str) -> bool:
        """Keep trainable `p` out of every set (plain). False when it already is in one (then it stays there)."""
        name = self.name_of[id(p)]
        if name in self.root_key:
            return False
        self.constants.add(name)
        self.affine_of.setdefault(name, reason)
        return True

    def _node_inputs(self, node):
        return list(node.all_input_nodes)

    def _plain_inputs(self, nodes, reason):
        keys = [k for n in nodes for k in self._lab(n)]
        if keys:
            self.sets.mark_plain(keys, reason)

    def _param_root(self, p: nn.Parameter, layer: str, extra=()):
        """The root for a trainable parameter (with trainable companions that scale with it), or None."""
        if p is None or not p.requires_grad or self.name_of[id(p)] in self.constants:
            return None
        name = self.name_of[id(p)]
        if name in self.root_key:
            return self.sets.find(self.root_key[name])
        members = [name] + [self.name_of[id(q)] for q in extra if q is not None and q.requires_grad
                            and self.name_of[id(q)] not in self.root_key and self.name_of[id(q)] not in self.constants]
        self.root_key.update({n: name for n in members})
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
                obj = fetch_attr(m, node.target)
                if isinstance(obj, nn.Parameter) and obj.requires_grad:
                    self.lazy[node] = obj   # its root is made where it is first used (see _lab, _product)
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
            return self._source(node, mod, name)
        if isinstance(mod, _ATTENTION_MODULES):
            return self._attention(node, mod, name)
        if isinstance(mod, _UNARY_MODULES):
            return self._unary(node, args[0] if args else None)
        # A leaf module the detector does not model: nothing flowing through it can be proven invariant.
        self._plain_inputs(self._node_inputs(node), f"passes through {type(mod).__name__} {name}, "
                                                     "which the detector does not model")
        for p in mod.parameters():
            self.affine_of.setdefault(self.name_of[id(p)], f"inside {type(mod).__name__} {name}, "
                                                            "which the detector does not model")
        return {}

    def _source(self, node, mod, name: str) -> dict:
        """A conv/linear module: x W (+ b). With a bias and an input already scaled to degree 1 in one set,
        the weight is kept plain and the bias joins that set (see the module docstring)."""
        w, b = mod.weight, mod.bias
        x_lab = self._lab(node.args[0])
        layer = f"{type(mod).__name__} {name}"
        if self.choices and b is not None and b.requires_grad and len(x_lab) == 1 and set(x_lab.values()) == {1} and \
                self._make_constant(w, f"weight of {layer}, whose input is a scaled stream: kept plain so that its "
                                       "bias can scale with the stream"):
            broot = self._param_root(b, name)
            return self._sum_labels([x_lab, {broot: 1}], node, "bias add", layer)
        root = self._param_root(w, name, extra=[b] if b is not None else [])
        prod = add_labels([x_lab, {root: 1} if root else {}])
        if b is None:
            return prod
        broot = self._param_root(b, name)     # w's root when b joined it; b's own when it is already elsewhere
        blab = {broot: 1} if broot is not None else {}
        return self._sum_labels([prod, blab], node, "bias add", layer)

    def _attention(self, node, mod, name: str) -> dict:
        """nn.MultiheadAttention(query, key, value, ...): degree 1 in out_proj when q, k, v are all clean."""
        layer = f"{type(mod).__name__} {name}"
        inputs = self._node_inputs(node)
        labelled = [a for a in inputs if self._lab(a)]
        self._plain_inputs(labelled, f"enters {layer} (attention on a scaled input is not modelled)")
        for pname, p in mod.named_parameters():
            if not pname.startswith("out_proj."):
                self.affine_of.setdefault(self.name_of[id(p)], f"query/key/value projection of {layer}: softmax "
                                                               "of their product is not homogeneous")
        if labelled:
            return {}
        out = mod.out_proj
        root = self._param_root(out.weight, f"{name}.out_proj", extra=[out.bias] if out.bias is not None else [])
        lab = {root: 1} if root is not None else {}
        if out.bias is not None and out.bias.requires_grad and root is None:
            lab = {self._param_root(out.bias, f"{name}.out_proj"): 1}
        self.tuple_labels[node] = (lab, {})     # (attn_output, attn_weights): the weights do not scale
        return lab

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

    def _product(self, name: str, inputs) -> dict:
        """Degrees add; a bare parameter multiplying a weighted branch elementwise is kept plain (module doc)."""
        gains = [a for a in inputs if a in self.lazy]
        if self.choices and name in ("mul", "imul") and len(inputs) == 2 and len(gains) == 1:
            gain = gains[0]
            other = inputs[1] if inputs[0] is gain else inputs[0]
            if self._lab(other) and self._make_constant(self.lazy[gain], f"elementwise gain {gain.target} on a "
                                                        "weighted branch: kept plain so that the branch's weights "
                                                        "can scale with the stream it is added to"):
                del self.lazy[gain]
                self.labels[gain] = {}
        return add_labels([self._lab(a) for a in inputs])

    def _unary(self, node, data):
        others = [n for n in self._node_inputs(node) if n is not data]
        self._plain_inputs(others, f"used as a non-data argument of {node.name}")
        return self._lab(data)

    def _function(self, node):
        name = _fname(node.target)
        args, kwargs = node.args, node.kwargs
        inputs = self._node_inputs(node)
        if name == "getitem" and args and args[0] in self.tuple_labels and isinstance(args[1], int):
            return self._clean(self.tuple_labels[args[0]][args[1]])
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
                    obj = fetch_attr(self.model, a.target)
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
            return self._product(name, inputs)
        elif name in _DIV_FUNCS:
            num = args[0] if args else None
            den = args[1] if len(args) > 1 else kwargs.get("other")
            lab_n = self._lab(num)
            lab_d = self._lab(den)
            return add_labels([lab_n, {k: -d for k, d in lab_d.items()}])
        elif name in _LINEAR_FUNCS:
            x = args[0] if args else kwargs.get("input")
            wn = args[1] if len(args) > 1 else kwargs.get("weight")
            bn = args[2] if len(args) > 2 else kwargs.get("bias")
            self._plain_inputs([a for a in inputs if a not in (x, wn, bn)], f"non-data argument of {node.name}")
            prod = add_labels([self._lab(x), self._lab(wn)])
            if bn is None:
                return prod
            return self._sum_labels([prod, self._lab(bn)], node, "bias add")
        # anything else: not positively homogeneous as far as the detector knows
        self._plain_inputs(inputs, f"passes through {name} ({node.name}), which is not positively homogeneous "
                                   "(or not modelled)")
        return {}


def fetch_attr(model: nn.Module, target: str):
    obj = model
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
