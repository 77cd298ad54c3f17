"""Does the twin depart from the baseline faster than float noise does? Pure functions of the gap series.

Inputs are two gap runs of one seed, as `load_scalars` gives them (tag -> (steps, values)): `twin` (gap/: twin vs
baseline) and `control` (gap_control/: the baseline nudged by float32 round-off vs the baseline,
bigexp.analysis.control). Per gap tag:

    departure d     the tag's value for distances (max |Δlogit|, KL, direction gap, ...); 1 - value for similarities
                    (top-1 agreement, layer cosines), so 0 = identical and larger = further apart, for every tag
    ratio r_t       d_twin / d_control at each probe step t > 0 both runs have (step 0 is left out: there the twin
                    is exactly the baseline and the control is the nudge itself); a zero is taken as ZERO_FLOOR, and
                    a probe where both are 0 is skipped (nothing departed there)
    R               the geometric mean of r_t over those probes
    verdict         R > FACTOR: the twin departs faster than float noise; R < 1/FACTOR: it stays closer than float
                    noise does; otherwise it departs at the float-noise level

FACTOR = 10: two float32 runs nudged differently depart at rates that differ by a factor of a few (the chaotic
growth's rate is shared, its starting level is not), so an order of magnitude is the smallest ratio that says more
than "another nudge"; bigexp verify uses the same factor against its own nudged reference.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Optional

from bigexp.analysis.markdown import markdown_table
from bigexp.run import metrics as M

FACTOR = 10.0
ZERO_FLOOR = 1e-30
SIMILARITY_TAGS = frozenset({M.GAP_TOP1_AGREEMENT, M.GAP_EVAL_TOP1_AGREEMENT, M.GAP_MIN_LAYER_COSINE,
                             M.GAP_MEAN_LAYER_COSINE})
# What the report compares, in order (tag, label): the gap table's metrics and the eval-mode ones.
# No "|" in a label: it would split the markdown table's cell.
TAGS = ((M.GAP_MAX_ABS_LOGIT, "max abs Δlogit"), (M.GAP_REL_MAX_ABS_LOGIT, "rel. max Δlogit"), (M.GAP_KL, "KL"),
        (M.GAP_TOP1_AGREEMENT, "1 − top-1 agreement"), (M.GAP_MIN_LAYER_COSINE, "1 − min layer cos"),
        (M.GAP_MAX_DIRECTION_GAP, "max direction gap"), (M.GAP_MAX_PLAIN_REL_DIFF, "non-invariant rel. diff"),
        (M.GAP_EVAL_MAX_ABS_LOGIT, "eval max abs Δlogit"), (M.GAP_EVAL_KL, "eval KL"))


def departure(tag: str, value: float) -> float:
    """0 = identical, larger = further apart, for every gap tag."""
    return 1.0 - value if tag in SIMILARITY_TAGS else value


@dataclass
class Departure:
    tag: str
    steps: list = field(default_factory=list)     # probe steps compared (t > 0, not both 0)
    ratios: list = field(default_factory=list)    # d_twin / d_control at those steps
    last: Optional[tuple] = None                   # (step, d_twin, d_control) at the last common probe t > 0
    geo_mean: Optional[float] = None

    @property
    def verdict(self) -> str:
        if self.last is None:
            return "no probe after step 0 in both runs"
        if self.geo_mean is None:
            return "neither departs (0 at every probe)"
        if self.geo_mean > FACTOR:
            return f"twin departs faster than float noise (×{self.geo_mean:.3g})"
        if self.geo_mean < 1.0 / FACTOR:
            return f"twin stays closer than float noise (×{self.geo_mean:.3g})"
        return f"at the float-noise level (×{self.geo_mean:.3g})"


def compare_departure(tag: str, twin: tuple, control: tuple) -> Departure:
    """Departure of one tag from the two (steps, values) series (see the module docstring)."""
    dt = dict(zip(*twin))
    dc = dict(zip(*control))
    out = Departure(tag=tag)
    common = sorted(s for s in set(dt) & set(dc) if s > 0)
    if not common:
        return out
    s = common[-1]
    out.last = (s, departure(tag, dt[s]), departure(tag, dc[s]))
    for s in common:
        a, b = departure(tag, dt[s]), departure(tag, dc[s])
        if a <= 0.0 and b <= 0.0:
            continue
        out.steps.append(s)
        out.ratios.append(max(a, ZERO_FLOOR) / max(b, ZERO_FLOOR))
    if out.ratios:
        out.geo_mean = math.exp(math.fsum(math.log(r) for r in out.ratios) / len(out.ratios))
    return out


def departures(twin: Mapping, control: Mapping) -> list:
    """[Departure] for every tag of TAGS both gap runs logged."""
    return [compare_departure(t, twin[t], control[t]) for t, _ in TAGS if t in twin and t in control]


def departure_table(per_seed: Mapping) -> str:
    """Markdown: per seed (None = the single-seed layout) and gap metric, the geometric-mean ratio, the last probe's
    departures and the verdict. per_seed: seed -> (twin gap scalars, control gap scalars)."""
    labels = dict(TAGS)
    rows = []
    for seed, (twin, control) in per_seed.items():
        for d in departures(twin, control):
            last = "—" if d.last is None else f"{d.last[1]:.3g} vs {d.last[2]:.3g} (step {d.last[0]})"
            row = [] if seed is None else [str(seed)]
            rows.append(row + [labels[d.tag], str(len(d.ratios)),
                               "—" if d.geo_mean is None else f"{d.geo_mean:.3g}", last, d.verdict])
    if not rows:
        return ""
    head = [] if all(s is None for s in per_seed) else ["seed"]
    text = (f"Departure d = the gap (distances) or 1 − the gap (agreement, cosines): 0 = same as the baseline. "
            f"R = geometric mean over the probes after step 0 of d(twin) / d(control), the control being the "
            f"baseline from weights nudged by float32 round-off (compare.control). R > {FACTOR:g}: the twin "
            f"departs faster than float noise; R < 1/{FACTOR:g}: it stays closer; else it is at the float-noise "
            f"level. A probe where both are 0 is skipped, a single 0 counts as {ZERO_FLOOR:g}.")
    return text + "\n\n" + markdown_table(head + ["metric", "probes", "R", "last probe: twin vs control", "verdict"],
                                          rows)
