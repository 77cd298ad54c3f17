"""The chaos-floor control arm of `bigexp compare` (compare.control): the baseline again, started from weights
nudged by float32 round-off, same seed and data order.

Training is chaotic: any difference between two runs, even one ulp, grows roughly exponentially. The gap between
the baseline and its exp-LR twin therefore grows too, whatever the theorem says. The control measures how fast a
difference of pure rounding size grows on its own, so the report can tell "the twin departs faster than float noise"
(the twin computes another function) from "it departs as float noise does" (the theorem holds up to rounding).

The nudge: every trainable weight w -> w * (1 + REL * z), z ~ N(0, 1) drawn elementwise from a CPU generator seeded
with PERTURB_SEED, in the model's parameter order: the same nudge on every rank (no broadcast needed) and in every
job. Zero weights stay zero (a relative nudge). It is applied by train()'s step_hook at global_step 0, which runs
before the first step of a fresh run only: a resumed control arm continues from its checkpointed (nudged) weights.
"""
from __future__ import annotations

import torch

from bigexp.config.schema import Config
from bigexp.errors import ConfigError

REL = 1e-7            # about float32's unit round-off (2**-24 = 6e-8): the nudge is one or two ulp per weight
PERTURB_SEED = 1_000_003


def check_control(cfg: Config) -> None:
    """compare.control needs the optimizer to step the model's own tensors: fp32 without ZeRO. With bf16/fp16 or
    ZeRO-1 DeepSpeed keeps fp32 master copies, and a nudge of the model's weights would be overwritten by the first
    step's copy-back (and 1e-7 is below bf16's resolution anyway)."""
    if cfg.compare.control and (cfg.engine.precision != "fp32" or cfg.engine.zero_stage != 0):
        raise ConfigError(f"compare.control: needs engine.precision = fp32 and engine.zero_stage = 0 (got "
                          f"{cfg.engine.precision}, stage {cfg.engine.zero_stage}): with master copies the nudge "
                          f"of the model's weights would not reach the optimizer")


@torch.no_grad()
def perturb_relative_(model: torch.nn.Module, rel: float = REL, seed: int = PERTURB_SEED) -> int:
    """w -> w * (1 + rel * z) in place for every trainable parameter, z ~ N(0, 1) from a generator seeded with
    `seed` (drawn on the CPU in float32, so every device and rank gets the same z). Returns how many weights
    changed (a weight at 0, or one whose nudge rounds away, does not)."""
    g = torch.Generator().manual_seed(seed)
    changed = 0
    for p in model.parameters():
        if not p.requires_grad:
            continue
        z = torch.randn(p.shape, generator=g, dtype=torch.float32).to(device=p.device, dtype=p.dtype)
        before = p.detach().clone()
        p.add_(p * (rel * z))  # w + w*rel*z: computing 1 + rel*z first would round rel*z to float32's 6e-8 grid
        changed += int((p != before).sum())
    return changed


def _steps_model_tensors(engine) -> bool:
    """Does the engine's optimizer step the model's own parameters (no master copies)?"""
    mine = {id(p) for p in engine.ds.module.parameters()}
    theirs = [p for g in engine.client_optimizer.param_groups for p in g["params"]]
    return bool(theirs) and all(id(p) in mine for p in theirs)


class PerturbAtStart:
    """train()'s step_hook of the control arm: at global_step 0 (a fresh run, before its first step) nudge the
    weights, then hand every step to `then` (the arm's probe recorder), so the step-0 probe sees the nudged start."""

    def __init__(self, then=None, rel: float = REL, seed: int = PERTURB_SEED):
        self.then, self.rel, self.seed = then, rel, seed
        self.changed = None   # weights the nudge changed (set at step 0)

    def __call__(self, global_step: int, engine) -> None:
        if global_step == 0:
            if not _steps_model_tensors(engine):
                raise ConfigError("compare.control: the optimizer steps master copies, not the model's weights; "
                                  "run the control with engine.precision = fp32 and engine.zero_stage = 0")
            self.changed = perturb_relative_(engine.ds.module, self.rel, self.seed)
        if self.then is not None:
            self.then(global_step, engine)
