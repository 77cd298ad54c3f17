"""Across-seed statistics of a comparison (compare.seeds), as pure functions of numbers: no I/O, no torch.

    mean_sd(xs)                  mean and sample sd (n - 1 in the denominator; None for one value)
    t_quantile(p, dof)           Student t quantile, from the regularised incomplete beta function (math only:
                                 scipy is not a dependency), exact to ~1e-12
    paired_difference(a, b)      per-seed b - a, its mean, sd and two-sided 95 % t interval (n - 1 dof)
    verdict(name, d)             one line: "no detectable difference" or "<name> better/worse by X ± Y"
    band(series)                 mean ± sd across seeds at the steps every seed logged (plots' bands)
    seeds_section(...)           the report's markdown for several seeds
    seeds_layout(seeds)          [None] (one seed: run dirs <arm>) or the seeds (run dirs <arm>/seed<s>), checked
    array_tasks(arms, seeds)     (arm, seed) of each SLURM array task of `bigexp compare` (slurm/compare_array.sh)

The interval assumes the per-seed differences are independent draws from one normal distribution; with 2-5 seeds
it is wide (t = 12.7 for 2 seeds), which is the honest answer: a difference smaller than it is not resolved.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

from bigexp.analysis.markdown import markdown_table
from bigexp.errors import ConfigError

CONFIDENCE = 0.95
METRICS = (("final_top1", "final top-1 %"), ("best_top1", "best top-1 %"))   # (ArmSummary attribute, label)


def mean_sd(xs: Sequence[float]) -> tuple[float, Optional[float]]:
    """(mean, sample standard deviation with n - 1 dof); sd is None for fewer than two values."""
    n = len(xs)
    if n == 0:
        raise ValueError("mean_sd of no values")
    m = math.fsum(xs) / n
    if n < 2:
        return m, None
    return m, math.sqrt(math.fsum((x - m) ** 2 for x in xs) / (n - 1))


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz; Numerical Recipes 6.4)."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for aa in (m * (b - m) * x / ((a - 1.0 + 2 * m) * (a + 2 * m)),
                   -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 1.0 + 2 * m))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b), x in [0, 1]."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):   # the continued fraction converges fast on this side; else use symmetry
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_sf(t: float, dof: float) -> float:
    """P(T > t) for Student's t with `dof` degrees of freedom, t >= 0."""
    return 0.5 * betainc(dof / 2.0, 0.5, dof / (dof + t * t))


def t_quantile(p: float, dof: float) -> float:
    """The p-quantile of Student's t (p in (0.5, 1)), by bisection on t_sf: 4.303 for p = 0.975, dof = 2."""
    if not 0.5 < p < 1.0 or dof <= 0:
        raise ValueError(f"t_quantile needs 0.5 < p < 1 and dof > 0, got p={p}, dof={dof}")
    lo, hi = 0.0, 1.0
    while t_sf(hi, dof) > 1.0 - p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_sf(mid, dof) > 1.0 - p else (lo, mid)
        if hi - lo < 1e-13 * hi:
            break
    return 0.5 * (lo + hi)


@dataclass
class PairedDifference:
    seeds: list                  # the seeds both arms have a value for, sorted
    diffs: list                  # b - a per seed
    mean: float
    sd: Optional[float]
    half_width: Optional[float]  # of the two-sided CONFIDENCE interval; None for one seed

    @property
    def interval(self) -> Optional[tuple[float, float]]:
        return None if self.half_width is None else (self.mean - self.half_width, self.mean + self.half_width)


def paired_difference(a: Mapping[int, float], b: Mapping[int, float],
                      confidence: float = CONFIDENCE) -> Optional[PairedDifference]:
    """b - a per seed present in both (seed -> value), with mean ± t_{(1+c)/2, n-1} sd / sqrt(n). None when no
    seed has both."""
    seeds = sorted(s for s in set(a) & set(b) if a[s] is not None and b[s] is not None)
    if not seeds:
        return None
    diffs = [b[s] - a[s] for s in seeds]
    m, sd = mean_sd(diffs)
    hw = None if sd is None else t_quantile(0.5 + confidence / 2.0, len(diffs) - 1) * sd / math.sqrt(len(diffs))
    return PairedDifference(seeds=seeds, diffs=diffs, mean=m, sd=sd, half_width=hw)


def verdict(name: str, d: Optional[PairedDifference], unit: str = "pp") -> str:
    """'no detectable difference' when the interval holds 0, else '<name> better/worse by X ± Y <unit>' (X the mean
    difference, Y the interval's half width); higher is better."""
    if d is None:
        return "no paired seeds"
    if d.half_width is None:
        return f"one seed only: {name} {d.mean:+.2f} {unit}, no interval"
    if abs(d.mean) <= d.half_width:
        return f"no detectable difference ({d.mean:+.2f} ± {d.half_width:.2f} {unit})"
    return f"{name} {'better' if d.mean > 0 else 'worse'} by {abs(d.mean):.2f} ± {d.half_width:.2f} {unit}"


def band(series: Sequence[tuple]) -> tuple[list, list, list]:
    """(steps, mean, sd) across several (steps, values) series at the steps all of them have; sd 0 for one."""
    maps = [dict(zip(st, vs)) for st, vs in series]
    if not maps:
        return [], [], []
    steps = sorted(set.intersection(*(set(m) for m in maps)))
    means, sds = [], []
    for s in steps:
        m, sd = mean_sd([mp[s] for mp in maps])
        means.append(m)
        sds.append(sd or 0.0)
    return steps, means, sds


# ---------------------------------------------------------------------------------------------- report section
def _fmt_mean_sd(values: list) -> str:
    if not values:
        return "—"
    m, sd = mean_sd(values)
    return f"{m:.2f}" if sd is None else f"{m:.2f} ± {sd:.2f}"


def seeds_section(by_arm: Mapping[str, Mapping[int, object]], baseline: str) -> str:
    """Markdown: per arm mean ± sd over seeds of final and best top-1, then each arm minus the baseline paired by
    seed with its 95 % interval and a verdict. by_arm: arm -> seed -> ArmSummary (attributes of METRICS)."""
    rows = []
    for arm, per_seed in by_arm.items():
        row = [arm, ", ".join(str(s) for s in per_seed)]
        for attr, _ in METRICS:
            row.append(_fmt_mean_sd([getattr(v, attr) for v in per_seed.values() if getattr(v, attr) is not None]))
        rows.append(row)
    lines = [f"Mean ± sample sd over seeds (n - 1 dof). Paired: the difference arm − {baseline} per seed, its mean "
             f"± half width of the two-sided {CONFIDENCE:.0%} t interval (n - 1 dof); \"no detectable difference\" "
             f"when that interval holds 0.", "",
             markdown_table(["arm", "seeds"] + [h for _, h in METRICS], rows), ""]
    diff_rows = []
    base = by_arm.get(baseline, {})
    for arm, per_seed in by_arm.items():
        if arm == baseline:
            continue
        for attr, label in METRICS:
            d = paired_difference({s: getattr(v, attr) for s, v in base.items()},
                                  {s: getattr(v, attr) for s, v in per_seed.items()})
            per = "—" if d is None else ", ".join(f"{x:+.2f}" for x in d.diffs)
            ci = "—" if d is None or d.interval is None else f"[{d.interval[0]:+.2f}, {d.interval[1]:+.2f}]"
            diff_rows.append([f"{arm} − {baseline}", label, per, ci, verdict(arm, d)])
    if diff_rows:
        lines += [markdown_table(["paired", "metric", "per seed", f"{CONFIDENCE:.0%} interval", "verdict"],
                                 diff_rows), ""]
    return "\n".join(lines)


def seeds_layout(seeds: Sequence[int]) -> list:
    """[None] for the single-seed layout (compare.seeds empty or one seed: run.seed is that seed, run directories
    <arm>), else the seeds (run directories <arm>/seed<s>). A seed twice is a ConfigError: they share a directory."""
    seeds = list(seeds)
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"compare.seeds = {seeds}: each seed at most once (they share the run directory name)")
    return seeds if len(seeds) > 1 else [None]


def array_tasks(arms: Sequence[str], seeds: Sequence[int]) -> list[tuple[str, Optional[int]]]:
    """(arm, seed) of each task of a SLURM job array running `bigexp compare --arm ARM [--seed S]`: task i is
    entry i, arm-major (all seeds of the first arm, then the next arm); seed None in the single-seed layout
    (`seeds_layout`), where there is one task per arm and no --seed."""
    return [(arm, seed) for arm in arms for seed in seeds_layout(seeds)]
