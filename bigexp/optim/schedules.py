"""Per-step base LR / weight-decay schedules (timm style) and the scheduler that writes them into param groups.

A schedule maps an optimizer step (0-based: the step about to be taken) to a factor of the group's base LR;
`BaseSchedule` owns the linear warmup, subclasses the shape after it. `ParamGroupScheduler` writes
group['lr'] = base_lr * lr_factor(t) and group['weight_decay'] = base_weight_decay * wd_factor(t).
For ExpSGD's scale-invariant groups these are the BASE schedule (eta_t, lambda_t); ExpSGD turns them into the
exponential LR itself, so the same scheduler drives both arms of a comparison.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

from bigexp.errors import CheckpointError

__all__ = [
    "BaseSchedule",
    "ConstantSchedule",
    "StepSchedule",
    "CosineSchedule",
    "LinearSchedule",
    "build_schedule",
    "ParamGroupScheduler",
    "scheduler_factory",
]


class BaseSchedule:
    """Linear warmup + a shape. Stateless: the factor at step t depends only on t.

    total_steps: optimizer steps in the run (> 0). warmup_steps: steps of linear warmup (>= 0); the factor
    rises from warmup_start_factor (in (0, 1]) at step 0 to 1 at step warmup_steps and multiplies the shape.
    weight_decay_follows_lr: wd_factor(t) = lr_factor(t) (else 1).
    """

    kind = "base"

    def __init__(self, total_steps: int, warmup_steps: int = 0, warmup_start_factor: float = 1.0,
                 weight_decay_follows_lr: bool = False):
        if int(total_steps) <= 0:
            raise ValueError(f"total_steps must be > 0, got {total_steps!r}")
        if int(warmup_steps) < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps!r}")
        if not (0.0 < warmup_start_factor <= 1.0):
            raise ValueError(f"warmup_start_factor must be in (0, 1], got {warmup_start_factor!r}")
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.warmup_start_factor = float(warmup_start_factor)
        self.weight_decay_follows_lr = bool(weight_decay_follows_lr)

    def shape(self, step: int) -> float:
        """The factor without warmup (subclasses)."""
        return 1.0

    def warmup(self, step: int) -> float:
        if step >= self.warmup_steps:
            return 1.0
        return self.warmup_start_factor + (1.0 - self.warmup_start_factor) * step / self.warmup_steps

    def lr_factor(self, step: int) -> float:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step!r}")
        return self.warmup(step) * self.shape(step)

    def wd_factor(self, step: int) -> float:
        return self.lr_factor(step) if self.weight_decay_follows_lr else 1.0

    def describe(self) -> dict:
        """The schedule's parameters (stored in checkpoints, compared on resume)."""
        return {"kind": self.kind, "total_steps": self.total_steps, "warmup_steps": self.warmup_steps,
                "warmup_start_factor": self.warmup_start_factor,
                "weight_decay_follows_lr": self.weight_decay_follows_lr}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()})"


class ConstantSchedule(BaseSchedule):
    kind = "constant"


class StepSchedule(BaseSchedule):
    """Factor gamma**(number of milestones <= step); milestones in steps (absolute, not shifted by warmup)."""

    kind = "step"

    def __init__(self, total_steps: int, milestones_steps: Sequence[int], gamma: float, **kw):
        super().__init__(total_steps, **kw)
        ms = [int(m) for m in milestones_steps]
        if any(m < 0 for m in ms) or any(b <= a for a, b in zip(ms, ms[1:])):
            raise ValueError(f"milestones must be increasing and >= 0, got {list(milestones_steps)!r} (steps)")
        if not (0.0 < gamma <= 1.0):
            raise ValueError(f"gamma must be in (0, 1], got {gamma!r}")
        self.milestones_steps = ms
        self.gamma = float(gamma)

    def shape(self, step: int) -> float:
        return self.gamma ** sum(1 for m in self.milestones_steps if step >= m)

    def describe(self) -> dict:
        return {**super().describe(), "milestones_steps": list(self.milestones_steps), "gamma": self.gamma}


class _AnnealSchedule(BaseSchedule):
    """Shape from 1 at the end of warmup to final_factor at the last step (total_steps - 1)."""

    def __init__(self, total_steps: int, final_factor: float = 0.0, **kw):
        super().__init__(total_steps, **kw)
        if not (0.0 <= final_factor <= 1.0):
            raise ValueError(f"final_factor must be in [0, 1], got {final_factor!r}")
        self.final_factor = float(final_factor)

    def progress(self, step: int) -> float:
        span = self.total_steps - 1 - self.warmup_steps
        if span <= 0:
            return 1.0 if step >= self.warmup_steps else 0.0
        return min(max((step - self.warmup_steps) / span, 0.0), 1.0)

    def describe(self) -> dict:
        return {**super().describe(), "final_factor": self.final_factor}


class CosineSchedule(_AnnealSchedule):
    kind = "cosine"

    def shape(self, step: int) -> float:
        u = self.progress(step)
        return self.final_factor + (1.0 - self.final_factor) * 0.5 * (1.0 + math.cos(math.pi * u))


class LinearSchedule(_AnnealSchedule):
    kind = "linear"

    def shape(self, step: int) -> float:
        return 1.0 + (self.final_factor - 1.0) * self.progress(step)


def _steps(epochs: float, steps_per_epoch: int) -> int:
    return int(math.floor(epochs * steps_per_epoch + 0.5))


def build_schedule(cfg: Any, steps_per_epoch: int, total_steps: int) -> BaseSchedule:
    """A schedule from a `ScheduleConfig` (bigexp.config.schema): epochs are converted with steps_per_epoch.

    Milestones and warmup_epochs may be fractional epochs; they are rounded to the nearest step (half up).
    """
    if int(steps_per_epoch) <= 0:
        raise ValueError(f"steps_per_epoch must be > 0, got {steps_per_epoch!r}")
    common = dict(warmup_steps=_steps(cfg.warmup_epochs, steps_per_epoch),
                  warmup_start_factor=cfg.warmup_start_factor,
                  weight_decay_follows_lr=cfg.weight_decay_follows_lr)
    if cfg.kind == "constant":
        return ConstantSchedule(total_steps, **common)
    if cfg.kind == "step":
        try:
            ms = [_steps(float(m), steps_per_epoch) for m in cfg.milestones]
        except (TypeError, ValueError):
            raise ValueError(f"schedule.milestones must be a list of epochs (numbers), got {cfg.milestones!r}") from None
        try:
            return StepSchedule(total_steps, ms, cfg.gamma, **common)
        except ValueError as e:
            raise ValueError(f"schedule.milestones = {list(cfg.milestones)!r} (epochs): {e}") from None
    if cfg.kind == "cosine":
        return CosineSchedule(total_steps, final_factor=cfg.final_factor, **common)
    if cfg.kind == "linear":
        return LinearSchedule(total_steps, final_factor=cfg.final_factor, **common)
    raise ValueError(f"schedule.kind must be one of constant, step, cosine, linear; got {cfg.kind!r}")


class ParamGroupScheduler:
    """Writes a schedule into every param group of an optimizer, one `.step()` per optimizer step.

    At construction each group gets 'base_lr' / 'base_weight_decay' (from its current 'lr' / 'weight_decay'
    unless already present, e.g. after a resume) and the step-0 values are written. `.step()` advances to
    the next step and writes that step's values; DeepSpeed calls it after each optimizer step, so before
    optimizer step t the groups hold the values for t. Only the group dicts are touched (never the params),
    so it works on DeepSpeed's wrapped optimizers, whose param_groups are the client's group dicts with params
    replaced by flat shards.
    """

    def __init__(self, optimizer: Any, schedule: BaseSchedule, last_step: int = 0):
        self.optimizer = optimizer
        self.schedule = schedule
        for i, g in enumerate(optimizer.param_groups):
            for key in ("lr", "weight_decay"):
                if key not in g and f"base_{key}" not in g:
                    raise ValueError(f"param group {i} has no {key!r}")
            g.setdefault("base_lr", float(g["lr"]))
            g.setdefault("base_weight_decay", float(g.get("weight_decay", 0.0)))
        self.last_step = int(last_step)
        self._apply()

    def _apply(self) -> None:
        t = self.last_step
        lf, wf = self.schedule.lr_factor(t), self.schedule.wd_factor(t)
        for g in self.optimizer.param_groups:
            g["lr"] = g["base_lr"] * lf
            g["weight_decay"] = g["base_weight_decay"] * wf
        self._last_lr = [g["lr"] for g in self.optimizer.param_groups]

    def step(self, *args, **kwargs) -> None:
        """Advance one optimizer step. Extra arguments (DeepSpeed passes lr_kwargs) are ignored."""
        self.last_step += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return list(self._last_lr)

    def get_lr(self) -> list[float]:
        return self.get_last_lr()

    def state_dict(self) -> dict:
        return {"last_step": self.last_step, "schedule": self.schedule.describe(),
                "base_lrs": [g["base_lr"] for g in self.optimizer.param_groups],
                "base_weight_decays": [g["base_weight_decay"] for g in self.optimizer.param_groups]}

    def load_state_dict(self, state: dict) -> None:
        """Restore the step and the groups' base values; the schedule itself comes from the (current) config
        and must be the one saved: a changed schedule raises CheckpointError naming what changed (a resumed
        run with another schedule is another experiment, and would otherwise continue silently)."""
        changed = schedule_changes(state.get("schedule"), self.schedule.describe())
        if changed:
            raise CheckpointError(
                "the checkpoint was written under another LR schedule: " + "; ".join(changed) +
                ". Resume with the config it was trained with, or start a new run directory")
        n = len(self.optimizer.param_groups)
        if len(state["base_lrs"]) != n:
            raise ValueError(f"scheduler state has {len(state['base_lrs'])} param groups, the optimizer has {n}")
        for g, lr, wd in zip(self.optimizer.param_groups, state["base_lrs"], state["base_weight_decays"]):
            g["base_lr"], g["base_weight_decay"] = float(lr), float(wd)
        self.last_step = int(state["last_step"])
        self._apply()


def schedule_changes(saved: Any, current: dict) -> list[str]:
    """'key: saved -> current' for every schedule parameter that differs ([] when equal, or nothing was saved)."""
    if saved is None:
        return []
    return [f"schedule.{k}: {saved.get(k)!r} (checkpoint) -> {current.get(k)!r} (now)"
            for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]


def scheduler_factory(schedule: BaseSchedule) -> Callable[[Any], ParamGroupScheduler]:
    """A callable for deepspeed.initialize(lr_scheduler=...): DeepSpeed calls it with the client optimizer."""
    def make(optimizer: Any) -> ParamGroupScheduler:
        return ParamGroupScheduler(optimizer, schedule)
    return make
