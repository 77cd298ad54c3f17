"""Under torchrun (or alone): `bigexp train`'s own loop, recording what it consumes.

    train_recording.py OUT CONFIG [KEY=VALUE ...]

Runs `bigexp.run.loop.train` on the config with the overrides, with two recorders, and writes OUT/record_rank<r>.json:
  "batches": per micro-batch the loop took, [epoch, [sample indices]] -- TrainLoader.iter_from wrapped, the
             indices read from the loader's own order (`indices()`), the ones it decodes;
  "steps":   per optimizer step (the loop's step hook), [global step, the scheduler's step, each group's lr, each
             group's exp_step (ExpSGD's step count; null for plain groups)].
"""
import json
import sys
from pathlib import Path

from bigexp.config import load_config
from bigexp.data.loaders import TrainLoader
from bigexp.run import loop
from bigexp.run.distributed import exit_process, init_distributed, shutdown_distributed

BATCHES: list = []
STEPS: list = []
_iter_from = TrainLoader.iter_from


def recording_iter_from(self, batch_index):
    order = self.indices()
    for k, batch in enumerate(_iter_from(self, batch_index), start=batch_index):
        BATCHES.append([self.epoch, order[k * self.batch_size:(k + 1) * self.batch_size].tolist()])
        yield batch


def hook(step, engine):
    if step:
        groups = engine.client_optimizer.param_groups
        STEPS.append([step, engine.scheduler.last_step, [g["lr"] for g in groups],
                      [g.get("exp_step") for g in groups]])


def main(out: Path, config: str, overrides: list[str]):
    TrainLoader.iter_from = recording_iter_from   # __iter__ goes through it too
    cfg = load_config(config, overrides)
    ctx = init_distributed(cfg.run.device)
    loop.train(cfg, ctx=ctx, step_hook=hook)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"record_rank{ctx.rank}.json").write_text(json.dumps({"batches": BATCHES, "steps": STEPS}))
    shutdown_distributed()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3:])
    exit_process(0)  # past the C++ destructors, as `bigexp train` exits
