"""`bigexp config --config X [KEY=VALUE ...]`: print the config fully resolved (bases and overrides applied).

Exit status 2 with the one error message on stderr when the config is invalid.
"""
from __future__ import annotations

import argparse
import sys

from bigexp.config.load import add_config_arguments, config_from_args, save_resolved, to_yaml
from bigexp.config.validate import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--world-size", type=int, default=None, metavar="N",
                        help="also check data.batch_size against N ranks × engine.grad_accum")
    parser.add_argument("--sources", action="store_true",
                        help="annotate every key with the file (or command line) that set it")
    parser.add_argument("--save", metavar="PATH", default=None,
                        help="also write the resolved config to PATH (atomic; loads alone, no base:)")


def run(args: argparse.Namespace) -> int:
    try:
        cfg = config_from_args(args, world_size=args.world_size)
    except ConfigError as exc:
        print(f"bigexp: config error: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(to_yaml(cfg, with_sources=args.sources))
    if args.save:
        save_resolved(cfg, args.save)
    return 0
