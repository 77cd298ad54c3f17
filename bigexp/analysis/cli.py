"""The command lines of `bigexp compare`, `bigexp report` and `bigexp verify`.

bigexp/cli.py imports this module for each of the three and calls `add_arguments(parser)` then `run(args)`; which
command it is comes from the parser's prog ("bigexp compare"), the name the dispatcher gives it.

An error a user can cause (bigexp.errors: a config, data file, checkpoint or event file; a non-finite loss) is not
caught here: it reaches the dispatcher, which prints one line naming it and exits with exit_code_for's status.
Besides, `bigexp report` exits 2 when there is nothing to report and `bigexp verify` exits 1 when the check FAILs.

The commands' modules are imported inside their `run_*`: each brings torch, the data stack or TensorBoard with it,
and `bigexp report` should not wait for the training stack (nor `--help` for anything).
"""
from __future__ import annotations

import os
import sys

from bigexp.analysis.events import CONTROL_ARM
from bigexp.config import add_config_arguments, config_from_args_or_exit
from bigexp.run import metrics as M


# ---------------------------------------------------------------------------------------------- compare
def compare_arguments(parser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--arm", default=None, choices=["sgd", "expsgd", CONTROL_ARM],
                        help="run only this arm into the comparison's layout (one SLURM job per arm; "
                             f"{CONTROL_ARM} needs compare.control=true)")
    parser.add_argument("--seed", type=int, default=None,
                        help="run only this seed of compare.seeds (one SLURM job per arm and seed)")
    parser.add_argument("--layout-only", action="store_true",
                        help="no training: (re)write the custom-scalars layout, the gap run and the report")
    parser.add_argument("--lockstep", action="store_true",
                        help="both arms in one plain PyTorch loop on the same batches (no DeepSpeed, one process)")
    parser.add_argument("--float64", action="store_true", help="--lockstep in double precision")
    parser.add_argument("--no-report", action="store_true", help="skip report.md and the plots")
    parser.add_argument("--no-finish", action="store_true",
                        help="train only: no layout, gap runs or report (compare.parallel's children; a later "
                             "--layout-only writes them)")


def print_summary(result) -> None:
    """The logdir, the report's files and one line per arm (and the last gap) of a CompareResult."""
    print(f"\nlogdir:      {result.logdir}")
    print(f"tensorboard: tensorboard --logdir {result.logdir}")
    rep = result.report
    if rep is not None:
        print(f"report:      {rep.report_path}")
        for p in rep.plots:
            print(f"plot:        {p}")
        for s in rep.summaries:
            top1 = "—" if s.final_top1 is None else f"{s.final_top1:.2f}%"
            best = "—" if s.best_top1 is None else f"{s.best_top1:.2f}%"
            print(f"  {s.name:<14} final top-1 {top1:>7}  best {best:>7}  steps {s.steps if s.steps is not None else '—'}")
    if result.gap:
        last = result.gap[-1]
        print(f"  gap at step {last['step']}: max |Δlogit| {last[M.GAP_MAX_ABS_LOGIT]:.3g}, "
              f"KL {last[M.GAP_KL]:.3g}, top-1 agreement {last[M.GAP_TOP1_AGREEMENT]:.3f}")


def run_compare(args) -> int:
    from bigexp.analysis.lockstep import lockstep
    from bigexp.analysis.runner import compare
    from bigexp.run.distributed import exit_process, launcher_world_size, shutdown_distributed

    cfg = config_from_args_or_exit(args, world_size=launcher_world_size())
    if args.float64 and not args.lockstep:
        print("bigexp compare: --float64 needs --lockstep (DeepSpeed arms run in engine.precision)", file=sys.stderr)
        return 2
    if args.lockstep and (args.arm or args.layout_only or args.seed is not None):
        print("bigexp compare: --lockstep runs both arms together; it excludes --arm, --seed and --layout-only",
              file=sys.stderr)
        return 2
    if args.lockstep or args.layout_only:  # no process group, no DeepSpeed
        result = (lockstep(cfg, float64=args.float64, report=not args.no_report) if args.lockstep
                  else compare(cfg, layout_only=True, report=not args.no_report))
        print_summary(result)
        return 0
    if cfg.compare.parallel and args.arm is None and args.seed is None and launcher_world_size() == 1:
        from bigexp.analysis.parallel import compare_parallel
        print_summary(compare_parallel(cfg, report=not args.no_report))
        return 0
    if cfg.compare.parallel and args.arm is None and launcher_world_size() > 1 and os.environ.get("RANK", "0") == "0":
        print(f"[bigexp] compare.parallel: {launcher_world_size()} ranks train each arm together, one arm after the "
              f"other", flush=True)
    result = compare(cfg, arm=args.arm, seed=args.seed, report=not args.no_report, finish_layout=not args.no_finish)
    if os.environ.get("RANK", "0") == "0" and not args.no_finish:
        print_summary(result)
    shutdown_distributed()
    exit_process(0)  # past C++ destructors: see bigexp.run.distributed.exit_process (gloo abort at exit)
    return 0


# ---------------------------------------------------------------------------------------------- report
def report_arguments(parser) -> None:
    parser.add_argument("logdir", help="a `bigexp compare` logdir (<out_dir>/<name>) or one run directory")
    parser.add_argument("--no-plots", action="store_true", help="only the markdown table")


def run_report(args) -> int:
    from bigexp.analysis.report import build_report

    try:
        res = build_report(args.logdir, plots=not args.no_plots)
    except FileNotFoundError as e:  # nothing to report (no such directory, no event files): bad input
        print(f"bigexp report: {e}", file=sys.stderr)
        return 2
    print(res.text.split("## Plots")[0].rstrip())
    print(f"\nreport: {res.report_path}")
    for p in res.plots:
        print(f"plot:   {p}")
    return 0


# ---------------------------------------------------------------------------------------------- verify
def verify_arguments(parser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--network", choices=["invariant", "noninvariant"], default="invariant",
                        help="noninvariant: no norm layers, conv weights still claimed invariant (must FAIL)")


def run_verify(args) -> int:
    from bigexp.analysis.verify import format_result, verify

    cfg = config_from_args_or_exit(args)
    res = verify(cfg, network=args.network)
    out = format_result(res)
    print(out, file=sys.stdout if res.passed else sys.stderr)
    return 0 if res.passed else 1


# ---------------------------------------------------------------------------------------------- dispatch
SUBCOMMANDS = {"compare": (compare_arguments, run_compare), "report": (report_arguments, run_report),
               "verify": (verify_arguments, run_verify)}


def add_arguments(parser) -> None:
    """The dispatcher's hook: the command's options, and which `run_*` the parsed arguments belong to."""
    name = parser.prog.split()[-1]
    add, run_command = SUBCOMMANDS[name]
    add(parser)
    parser.set_defaults(analysis_command=run_command)


def run(args) -> int:
    return args.analysis_command(args)
