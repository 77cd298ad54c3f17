"""`bigexp doctor [--config X] [overrides] [--json]`: the environment and the numeric self-checks as one table.

Exit status: 0 when every check passed, 1 when one failed (FAIL, CRASH, HANG, ERROR), 2 for a bad config.
Compare DeepSpeed's `ds_report` and `torch.utils.collect_env`: those list versions; this also runs the configured
model's kernels on this machine against a float64 reference, because a kernel that is wrong on one CPU model
(oneDNN #6035 on AVX2) is invisible in a version list.
"""
from __future__ import annotations

import json
import os
import sys

import torch

from bigexp.config import add_config_arguments, config_from_args_or_exit
from bigexp.doctor.environment import environment_rows
from bigexp.doctor.numeric import TOL, Outcome, run_check
from bigexp.errors import ConfigError
from bigexp.memory_format import ONEDNN_6035, check_cpu_channels_last, resolve_memory_format
from bigexp.models import build_model

FAILED = ("FAIL", "CRASH", "HANG", "ERROR")


def add_arguments(parser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds per numeric check (default 180)")


def _spec(cfg, kind: str, **extra) -> dict:
    model = {k: getattr(cfg.model, k) for k in ("arch", "num_classes", "width", "bn_eps", "norm_affine",
                                                "zero_init_residual", "freeze_classifier")}
    return {"kind": kind, "model": model, "device": extra.pop("device"), "dtype": extra.pop("dtype", "fp32"),
            "channels_last": bool(cfg.model.channels_last or cfg.data.channels_last),
            "threads": cfg.run.threads or torch.get_num_threads(), "res": min(cfg.data.val_res, 64), "batch": 32,
            "tol": cfg.optim.invariance_check_tol, **extra}


def _graded(out: Outcome, tol: float, what: str) -> Outcome:
    if out.status != "ok":
        return out
    if not out.value <= tol:  # NaN fails too
        return Outcome("FAIL", f"{what} {out.value:.1e} > {tol:g}", out.value)
    return Outcome("ok", f"{what} {out.value:.1e} <= {tol:g}", out.value)


def numeric_rows(cfg, device: str, timeout_s: float) -> list[tuple[str, Outcome]]:
    rows: list[tuple[str, Outcome]] = []
    fmt = "channels-last" if (cfg.model.channels_last or cfg.data.channels_last) else "NCHW"
    try:
        check_cpu_channels_last(build_model(cfg.model), device, bool(cfg.model.channels_last))
        rows.append(("memory format", Outcome("ok", f"{fmt} on {device}")))
    except ConfigError as e:
        rows.append(("memory format", Outcome("FAIL", str(e).split(":", 1)[1].strip()[:400])))
    if device == "cpu":
        k = _graded(run_check({"kind": "kernel_6035", "threads": cfg.run.threads or torch.get_num_threads()},
                              timeout_s=timeout_s)[0], 1e-4, "weight-grad error")
        # The bare kernel is known-bad on AVX2 and guarded above: only informative, unless the run uses it.
        note = "" if k.status == "ok" else " (guarded: bigexp refuses channels-last where a model has this layer)"
        rows.append(("oneDNN #6035 kernel", Outcome("warn" if k.status in FAILED else k.status,
                                                     f"{k.status}: {k.detail}{note}", k.value)))
    precisions = ["fp32"] + ([cfg.engine.precision] if cfg.engine.precision != "fp32" else [])
    for prec in precisions:
        out, raw = run_check(_spec(cfg, "model_grad", device=device, dtype=prec), timeout_s=timeout_s)
        g = _graded(out, TOL[prec], "max rel. grad error vs float64")
        if raw.get("param"):
            g.detail += f" (worst: {raw['param']})"
        if raw.get("skipped_seeds"):  # a ReLU input within round-off of 0 there: bigexp.doctor.numeric._flips
            g.detail += f"; batch seeds {raw['skipped_seeds']} skipped (a ReLU took the other branch than float64)"
        rows.append((f"gradients {cfg.model.arch} {prec} {fmt}", g))
    out, raw = run_check(_spec(cfg, "invariance", device=device), timeout_s=timeout_s)
    inv = _graded(out, cfg.optim.invariance_check_tol, "max rel. output change under scaling")
    if raw:
        inv.detail += f"; {raw['sets']} invariant sets, {raw['numel']}/{raw['total']} weights"
    rows.append(("scale invariance", inv))
    return rows


def _print_table(env_rows, checks) -> None:
    w = max(len(k) for k, _ in env_rows + [(n, None) for n, _ in checks])
    print("bigexp doctor\n")
    for k, v in env_rows:
        print(f"  {k:<{w}}  {v}")
    print()
    for name, o in checks:
        print(f"  {name:<{w}}  {o.status:<5}  {o.detail}")
    bad = [n for n, o in checks if o.status in FAILED]
    print(f"\n{'FAILED: ' + ', '.join(bad) if bad else 'all checks passed'}")


def run(args) -> int:
    cfg = config_from_args_or_exit(args)
    device = "cuda" if cfg.run.device == "cuda" or (cfg.run.device == "auto" and torch.cuda.is_available()) else "cpu"
    resolve_memory_format(cfg, device)
    env_rows = environment_rows(cfg.run.device)
    checks = numeric_rows(cfg, device, args.timeout)
    failed = any(o.status in FAILED for _, o in checks)
    if args.json:
        print(json.dumps({"environment": dict(env_rows), "upstream": ONEDNN_6035,
                          "checks": {n: o.__dict__ for n, o in checks}, "ok": not failed}))
    else:
        _print_table(env_rows, checks)
    sys.stdout.flush()
    return 1 if failed else 0


