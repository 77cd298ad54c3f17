"""`find_scale_invariant`: trace the model, label the graph, form the sets, check them numerically, report.

The steps live in their own modules: `graph` (torch.fx labelling), `unionfind` (joint sets), `numeric` (the
scale-by-c check), `report` (what was found and why).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx
import torch.nn as nn

from bigexp.optim.invariance.graph import GraphAnalysis
from bigexp.optim.invariance.numeric import check_sets
from bigexp.optim.invariance.report import InvarianceReport, NormUse, ParamEntry, ParamSet


def find_scale_invariant(model: nn.Module, example_input: Optional[torch.Tensor], *, tol: float = 1e-3,
                         check=True, scale: float = 3.7, eps_gap: bool = False) -> InvarianceReport:
    """Find the parameter sets whose joint scaling by any c > 0 leaves the model's output unchanged.

    model:          an nn.Module that torch.fx.symbolic_trace can trace (pass the bare module, not a DeepSpeed
                    engine or DDP wrapper).
    example_input:  a batch (>= 2, better >= 4, for BatchNorm's batch statistics) used by the numeric check; it
                    is moved to the model's device and dtype. May be None when check=False. A bf16/fp16 model
                    is checked on a float32 copy.
    tol:            relative output change (L2 over all outputs, eps-compensated, see `bigexp.optim.invariance.numeric`)
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
    _check_arguments(tol, check, scale)
    an, sets = _analyse(model, _trace(model).graph)
    union_rel = union_gap = None
    if check:
        union_rel, union_gap = check_sets(model, example_input, sets, tol=tol, scale=scale, check=check,
                                          eps_gap=eps_gap)
    entries = _entries(model, sets, an.affine_of)
    return InvarianceReport(entries, sets, float(scale), float(tol), check, union_rel, union_gap)


def _check_arguments(tol: float, check, scale: float) -> None:
    if not tol > 0:
        raise ValueError(f"tol: must be > 0, got {tol!r}")
    if check not in (True, False, "grouped"):
        raise ValueError(f"check: must be True, False or 'grouped', got {check!r}")
    if not (scale > 0 and scale != 1):
        raise ValueError(f"scale: must be > 0 and != 1, got {scale!r}")


def _trace(model: nn.Module) -> fx.GraphModule:
    try:
        return fx.symbolic_trace(model)
    except Exception as e:  # noqa: BLE001 - re-raised with context
        raise RuntimeError(f"torch.fx could not trace {type(model).__name__} ({type(e).__name__}: {e}); scale "
                           "invariance is only ever decided from the traced graph, so this model cannot be used "
                           "with expsgd (make its forward traceable, or use optim.optimizer=sgd)") from e


def _analyse(model: nn.Module, graph: fx.Graph) -> tuple:
    """The graph labelled twice, as is and with the choices that keep a few parameters plain so that more weights
    can scale (`graph` module docstring; both are sound): the one with more invariant weights, ties as is."""
    numel = {n: p.numel() for n, p in model.named_parameters()}
    best = None
    for choices in (False, True):
        an = GraphAnalysis(model, choices=choices)
        an.run(graph)
        sets = _build_sets(an, model)
        count = sum(numel[n] for s in sets if s.invariant for n in s.params)
        if best is None or count > best[0]:
            best = (count, an, sets)
    return best[1], best[2]


def _set_norms(an: GraphAnalysis, root) -> dict:
    """(norm name, degree) -> NormUse for every norm layer that absorbs `root`'s set."""
    norms: dict = {}
    for use, lab in an.norm_uses:
        d = an.sets.resolve(lab).get(root, 0)
        if d:
            key = (use.name, d)
            norms.setdefault(key, NormUse(use.name, use.kind, d, use.running_mean, use.running_var, use.module))
    return norms


def _build_sets(an: GraphAnalysis, model: nn.Module) -> list:
    """One ParamSet per union-find class, in order of first appearance, with the graph's verdict and reason."""
    S = an.sets
    roots = [r for r in S.order if S.find(r) == r]
    model_order = {n: i for i, (n, _) in enumerate(model.named_parameters())}
    sets = []
    for i, r in enumerate(roots):
        norms = _set_norms(an, r)
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
    return sets


def _entries(model: nn.Module, sets: list, affine_of: dict) -> list:
    """A ParamEntry for every parameter of the model, model order: frozen, in a set, or plain (and why)."""
    set_of = {n: s for s in sets for n in s.params}
    entries = []
    for n, p in model.named_parameters():
        shape, numel = tuple(p.shape), p.numel()
        if not p.requires_grad:
            entries.append(ParamEntry(n, shape, numel, "frozen", None, "frozen (requires_grad=False)", None))
            continue
        s = set_of.get(n)
        if s is None:
            reason = affine_of.get(n, "not used in the traced forward")
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
    return entries
