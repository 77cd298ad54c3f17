"""`bigexp train --config X [overrides] [--resume auto|never|DIR]`: one arm, from a YAML config.

Runs alone, under torchrun (single/multi-node), the deepspeed launcher, or srun. An error a user can cause reaches
the dispatcher (bigexp/cli.py), which prints one line and exits with bigexp.errors.exit_code_for's status; a config
error stops earlier, in config_from_args_or_exit (status 2, before any process group exists).
"""
from __future__ import annotations

from bigexp.config import add_config_arguments, config_from_args_or_exit
from bigexp.run import loop
from bigexp.run.distributed import exit_process, launcher_world_size, shutdown_distributed


def add_arguments(parser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--resume", default=None,
                        help="'auto' (newest valid checkpoint of this run), 'never', or a checkpoint directory; "
                             "overrides run.resume")
    parser.add_argument("--accept-config-change", action="store_true",
                        help="resume even where the config differs from the checkpoint's in keys that change the "
                             "trajectory (bigexp/run/drift.py lists them); refused otherwise")


def run(args) -> int:
    """Train, leave the process group, exit 0 (past C++ destructors: see exit_process). Never returns."""
    cfg = config_from_args_or_exit(args, world_size=launcher_world_size())
    if args.resume is not None:
        cfg.run.resume = args.resume
    if args.accept_config_change:
        cfg.run.accept_config_change = True
    loop.train(cfg)  # looked up on the module at call time: tests replace it with a tripwire
    shutdown_distributed()
    exit_process(0)
    return 0
