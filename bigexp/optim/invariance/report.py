"""What `find_scale_invariant` found: every parameter, every (joint) set, why, and the numeric check's numbers.

Plain data classes; `InvarianceReport.format()` is the table logged as TensorBoard text (`invariance`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

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
