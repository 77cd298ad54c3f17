"""Where the README main job's time goes (`bigexp compare --config configs/fmnist/main.yaml`, both arms), from a
short slice of it: the real compare (probes, eval, checkpoints, report) with run.max_steps cut, every phase timed by
wrapping the functions the loop calls (nothing re-implemented), then extrapolated to the whole job.

Phases: import (deepspeed), per arm start-up (data files, loaders, model + invariance check + optimizer, DeepSpeed
engine incl. its op build), data (waiting for the loader; the first batch, with FFCV's JIT compile, apart),
forward, backward, DeepSpeed step (optimizer step apart), probes, logging, checkpoints, eval, compare's finish
(gap, report, plots).

    python bench/profile_main.py [--steps 60] [--config configs/fmnist/main.yaml] [KEY=VALUE ...]

KEY=VALUE overrides go to the config as on the bigexp command line (e.g. engine.compile=true data.batch_size=256).
Prints ONE JSON object on stdout.
"""
from __future__ import annotations

import argparse
import functools
import os
import shutil
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

C.take_stdout()

T_IMPORT = time.perf_counter()
import deepspeed  # noqa: E402,F401  (timed: every bigexp train pays it)
IMPORT_DEEPSPEED_S = time.perf_counter() - T_IMPORT
import torch  # noqa: E402

import bigexp.analysis.runner as runner  # noqa: E402
import bigexp.run.loop as loop  # noqa: E402
import bigexp.run.step as step  # noqa: E402
from bigexp.analysis.probes import ProbeRecorder  # noqa: E402
from bigexp.optim.expsgd import ExpSGD  # noqa: E402
from deepspeed.ops.op_builder.builder import OpBuilder  # noqa: E402

# (object, attribute, phase): wrapped so that each call's wall time adds to the phase
WRAPPED = [
    (loop, "ensure_betons", "startup_data_files"), (loop, "build_train_loader", "startup_loaders"),
    (loop, "build_val_loader", "startup_loaders"), (loop, "build_optimizer", "startup_model_invariance_optimizer"),
    (loop, "build_model", "startup_model_invariance_optimizer"), (loop, "build_engine", "startup_deepspeed_engine"),
    (loop, "_resume", "startup_resume_check"), (loop, "_log_step", "logging"), (loop, "_save", "checkpoint"),
    (loop, "_evaluate", "eval"), (loop, "_finish", "finish_arm"), (runner, "finish", "compare_finish"),
    (ProbeRecorder, "__call__", "probes"), (OpBuilder, "jit_load", "startup_deepspeed_op_build"),
    (deepspeed.DeepSpeedEngine, "forward", "forward"),
    (deepspeed.DeepSpeedEngine, "backward", "backward"), (deepspeed.DeepSpeedEngine, "step", "deepspeed_step"),
    (ExpSGD, "step", "optimizer_step"), (torch.optim.SGD, "step", "optimizer_step"),
]


class Timers:
    def __init__(self):
        self.s = defaultdict(float)
        self.n = defaultdict(int)
        self.steps_per_epoch = 0
        self.in_train_step = False   # forward: a training micro-batch, else an eval (or probe) batch
        self.epoch_start = False     # the next batch is an epoch's first (FFCV's JIT on the first ever)

    def add(self, phase: str, dt: float) -> None:
        if phase == "forward" and not self.in_train_step:
            phase = "forward_outside_train_step"  # eval's and the probes' forwards: inside their own phases
        self.s[phase] += dt
        self.n[phase] += 1

    def wrap(self, owner, attr: str, phase: str) -> None:
        fn = getattr(owner, attr)

        @functools.wraps(fn)
        def timed(*a, **kw):
            t = C.timer()
            try:
                return fn(*a, **kw)
            finally:
                self.add(phase, t())
        setattr(owner, attr, timed)

    def timed_batches(self, it):
        """The loader iterator, its waits timed (an epoch's first batch apart: FFCV's JIT, its threads start)."""
        it = iter(it)
        while True:
            t = C.timer()
            try:
                item = next(it)
            except StopIteration:
                return
            self.add("data_epoch_first_batch" if self.epoch_start else "data", t())
            self.epoch_start = False
            yield item


def install(timers: Timers) -> None:
    for owner, attr, phase in WRAPPED:
        timers.wrap(owner, attr, phase)
    real_train_step = step.train_step

    def train_step(engine, micro_batches, ctx, **kw):
        t = C.timer()
        timers.in_train_step = True
        try:
            return real_train_step(engine, timers.timed_batches(micro_batches), ctx, **kw)
        finally:
            timers.in_train_step = False
            timers.add("train_step", t())
    loop.train_step = train_step
    real_build_data = loop._build_data

    def build_data(run):
        real_build_data(run)
        timers.steps_per_epoch = run.steps_per_epoch  # of the sliced run: max_steps does not change it
    loop._build_data = build_data
    real_epoch = loop._train_epoch

    def train_epoch(run, state):
        timers.epoch_start = True
        return real_epoch(run, state)
    loop._train_epoch = train_epoch


def estimate(t: dict, n: dict, steps_done: int, arms: int, job: dict, probes_done: int, epochs_done: int) -> dict:
    """Seconds of the whole job, from the slice: start-up and finish as measured once per arm, per-step, per-epoch
    and per-eval costs scaled to the job's counts (`job`)."""
    first_batch = t.get("data_epoch_first_batch", 0.0) / max(epochs_done, 1)   # per epoch, not per step
    per_step = (t.get("train_step", 0.0) - t.get("data_epoch_first_batch", 0.0) + t.get("logging", 0.0)) / max(
        steps_done, 1)
    per_eval = t.get("eval", 0.0) / max(n.get("eval", 0), 1)
    per_probe = t.get("probes", 0.0) / max(probes_done, 1)  # the hook runs every step, records every N
    per_ckpt = t.get("checkpoint", 0.0) / max(n.get("checkpoint", 0), 1)
    # the op build happens inside the engine's build, once per process (later arms find the op loaded)
    startup = sum(v for k, v in t.items() if k.startswith("startup_") and k != "startup_deepspeed_op_build") / arms
    startup_no_build = startup - t.get("startup_deepspeed_op_build", 0.0) / arms
    arm_s = (startup_no_build + job["steps_per_arm"] * per_step + job["epochs"] * first_batch
             + job["evals_per_arm"] * (per_eval + per_ckpt) + job["probes_per_arm"] * per_probe
             + t.get("finish_arm", 0.0) / arms)
    steps_s = arms * job["steps_per_arm"] * per_step
    job_s = IMPORT_DEEPSPEED_S + t.get("startup_deepspeed_op_build", 0.0) + arms * arm_s + t.get("compare_finish", 0.0)
    return {"per_step_s": per_step, "per_epoch_first_batch_s": first_batch, "per_eval_s": per_eval,
            "per_probe_s": per_probe, "per_checkpoint_s": per_ckpt, "startup_per_arm_s": startup_no_build,
            "deepspeed_op_build_s": t.get("startup_deepspeed_op_build", 0.0), "arm_s": arm_s, "job_s": job_s,
            "steps_fraction_of_job": steps_s / job_s}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(C.REPO / "configs" / "fmnist" / "main.yaml"))
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per arm (run.max_steps)")
    p.add_argument("--out", default=str(C.OUT_DIR / "profile_main"))
    p.add_argument("overrides", nargs="*", help="KEY=VALUE config overrides")
    args = p.parse_args(argv)
    from bigexp.config import load_config

    shutil.rmtree(args.out, ignore_errors=True)
    full = load_config(args.config, list(args.overrides))
    cfg = load_config(args.config, [f"run.out_dir={args.out}", "run.progress=false", f"run.max_steps={args.steps}",
                                    *args.overrides])
    timers = Timers()
    install(timers)
    report = C.base_report("profile_main", args)
    report["load_avg_start"] = list(os.getloadavg())
    t = C.timer()
    runner.compare(cfg)
    wall = t()
    arms = len(runner.run_arms(cfg))
    t_, n_ = dict(timers.s), dict(timers.n)
    t_["optimizer_step_inside_deepspeed_step"] = t_.pop("optimizer_step", 0.0)
    n_["optimizer_step_inside_deepspeed_step"] = n_.pop("optimizer_step", 0)
    job_steps = full.run.epochs * timers.steps_per_epoch
    evals = -(-full.run.epochs // full.run.eval_every_epochs)
    probes = job_steps // full.compare.probe_every_steps + 1
    job = {"steps_per_arm": job_steps, "epochs": full.run.epochs, "evals_per_arm": evals, "probes_per_arm": probes,
           "batch_size": full.data.batch_size}
    report.update(import_deepspeed_s=IMPORT_DEEPSPEED_S, slice_wall_s=wall, arms=arms, steps_per_arm=args.steps,
                  seconds=t_, calls=n_, job=job,
                  estimate=estimate(t_, n_, arms * args.steps, arms, job,
                                    arms * (args.steps // full.compare.probe_every_steps + 1),
                                    arms * -(-args.steps // timers.steps_per_epoch)),
                  load_avg_end=list(os.getloadavg()), threads=torch.get_num_threads())
    C.emit(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
