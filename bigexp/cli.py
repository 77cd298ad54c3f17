"""`bigexp <command>`: a thin dispatcher.

Each command lives in its own module exposing `add_arguments(parser)` and `run(args) -> int`;
the module is imported only when its command runs, so `bigexp --help` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "train": ("bigexp.run.loop", "train one arm from a YAML config (under torchrun, srun or alone)"),
    "data": ("bigexp.data.cli", "write FFCV .beton files (ImageFolder / Fashion-MNIST)"),
    "compare": ("bigexp.analysis.compare", "run the step-decay baseline and its exp-LR twin side by side"),
    "report": ("bigexp.analysis.report", "markdown table and PNG plots from a TensorBoard logdir"),
    "verify": ("bigexp.analysis.verify", "1-minute float64 self-check of the equivalence for a config"),
    "config": ("bigexp.config.show", "print a config fully resolved (bases and overrides applied)"),
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
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
