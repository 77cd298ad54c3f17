"""Union-find over the graph's roots: which weights must be scaled together (joint sets), and which are plain.

A root is a trainable conv/linear weight (with its bias). Two roots are merged when a sum (a residual add, a
concatenation, a layer's bias) meets operands whose degrees in them differ: such a sum is only homogeneous when
both scale together. Each class carries its members, its layers, why it is plain (if it is) and which kinds of
sum merged it.
"""
from __future__ import annotations


class JointSets:
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


def add_labels(labels):
    """Degrees of a product: the sum of its factors' labels (zero degrees dropped)."""
    out: dict = {}
    for lab in labels:
        for k, d in lab.items():
            out[k] = out.get(k, 0) + d
    return {k: d for k, d in out.items() if d != 0}
