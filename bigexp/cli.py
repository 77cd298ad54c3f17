"""`bigexp <command>`: a thin dispatcher, and the one place an error a user can cause becomes an exit status.

Each command lives in its own module exposing `add_arguments(parser)` and `run(args) -> int`;
the module is imported only when its command runs, so `bigexp --help` stays fast.

A `bigexp.errors.BigexpError` (or ENOSPC) reaching here, from any command, prints one line `bigexp <command>: <message>`
(`[rank r] ` before the message on ranks other than 0) and exits with `bigexp.errors.exit_code_for`'s status; any
other exception is a bug: its traceback, status 1.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from bigexp.errors import EXIT_CODES, BigexpError, exit_code_for

COMMANDS = {
    "train": ("bigexp.run.cli", "train one arm from a YAML config (under torchrun, srun or alone)"),
    "data": ("bigexp.data.cli", "write FFCV .beton files (ImageFolder / Fashion-MNIST)"),
    "compare": ("bigexp.analysis.cli", "run the step-decay baseline and its exp-LR twin side by side"),
    "report": ("bigexp.analysis.cli", "markdown table and PNG plots from a TensorBoard logdir"),
    "verify": ("bigexp.analysis.cli", "1-minute float64 self-check of the equivalence for a config"),
    "config": ("bigexp.config.show", "print a config fully resolved (bases and overrides applied)"),
    "doctor": ("bigexp.doctor.cli", "check this machine before a long run: versions, ISA, GPUs, numeric self-checks"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:<8} {doc}" for name, (_, doc) in COMMANDS.items()]
        print("usage: bigexp <command> [options]\n\ncommands:\n" + "\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nbigexp: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    name = argv[0]
    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"bigexp {name}", description=COMMANDS[name][1])
    module.add_arguments(parser)
    try:
        # Lets KEY=VALUE config overrides sit anywhere among the options (`--config X optim.lr=0.2 --flag b=1`).
        args = parser.parse_intermixed_args(argv[1:])
    except TypeError:  # parsers with subcommands cannot be intermixed
        args = parser.parse_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except (BigexpError, OSError) as exc:
        code = exit_code_for(exc)
        if code == EXIT_CODES["error"] and not isinstance(exc, BigexpError):
            raise  # an OSError that is not the user's (not ENOSPC): the traceback is the report
        return fail(name, exc, code)


def fail(command: str, exc: BaseException, code: int) -> int:
    """Print `bigexp <command>: <message>` and return `code`; under a process group, exit with it at once.

    No barrier and no process-group teardown on the way out: the other ranks may not have hit the same error and
    would never join one (torchrun's agent ends them when this rank exits).
    """
    rank = os.environ.get("RANK", "0")
    print(f"bigexp {command}: {'' if rank == '0' else f'[rank {rank}] '}{exc}", file=sys.stderr, flush=True)
    dist = sys.modules.get("torch.distributed")  # only a command that already imported torch can have a group
    # One rank (an in-process store) has no peer to abort at exit: return, so an in-process caller (a test) lives on.
    if dist is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        # Imported here, not at the top: it imports torch, and the dispatcher must stay fast for `--help`.
        from bigexp.run.distributed import exit_process

        exit_process(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
