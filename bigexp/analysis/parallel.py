"""`compare.parallel`: the arms of a comparison as concurrent processes on one CPU machine, then the usual finish.

Why: a small network on a CPU scales poorly with threads (fmnist_resnet at 28 px, one step of 128 images on this
2-core Xeon: 0.120 s on one thread, 0.110 s on two; two one-thread processes side by side: 0.166 s each, so two
arms take 0.083 s per arm-step instead of 0.110 s: bench/parallel_arms.py). Each (arm, seed) is one child
`python -m bigexp compare --config <logdir>/compare.yaml --arm A [--seed S]`: the same code path a SLURM job per
arm takes (bigexp.analysis.runner.compare with arm=), into the same layout, so nothing here re-implements
training. The parent writes the .beton files first (children would race to write them), runs at most
min(runs, cores) children at a time, each with cores // that many torch threads, shows their progress on one
line and their output prefixed "[arm] ", forwards SIGTERM/SIGINT (each child checkpoints: bigexp.run.signals),
and when all have ended writes the layout, the gap runs and the report (runner.finish).

On CUDA the arms share the device rather than cores: there `compare.parallel` falls back to one after the other
(with a line saying so); a GPU per arm is the SLURM array's job (launch/slurm).
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from bigexp.analysis.events import seed_run
from bigexp.analysis.runner import (CompareResult, arm_cfg_for, compare, finish, logdir_of, run_arms,
                                    seed_layout)
from bigexp.config import save_resolved
from bigexp.config.schema import Config
from bigexp.data.ensure import ensure_betons
from bigexp.errors import BigexpError, ConfigError
from bigexp.run import allocator
from bigexp.run.distributed import usable_cores

CONFIG_FILE = "compare.yaml"
# tqdm's line for an epoch of an arm: "<run.name> epoch 3:  45%|####  | 212/469 [00:31<00:38, 6.8it/s]"
_TQDM = re.compile(r"epoch (\d+):\s*\d+%\|.*?\|\s*(\d+)/(\d+)")


class ArmProcessError(BigexpError):
    """A child of a parallel comparison ended with a non-zero status; its own message is above, prefixed."""

    def __init__(self, failed: dict):
        self.failed = failed
        self.exit_code = max(failed.values())
        names = ", ".join(f"{name} (status {code})" for name, code in failed.items())
        super().__init__(f"compare.parallel: {names} failed; the other arms' runs are complete in their "
                         f"directories (rerun the same command: finished arms resume as done)")


@dataclass
class Child:
    name: str                      # the run: arm, or <arm>/seed<s>
    argv: list
    proc: Optional[subprocess.Popen] = None
    status: str = "waiting"        # the progress line's part for this run
    code: Optional[int] = None
    threads: list = field(default_factory=list)


def uses_cuda(cfg: Config) -> bool:
    return cfg.run.device == "cuda" or (cfg.run.device == "auto" and torch.cuda.is_available())


def plan(cfg: Config, cores: Optional[int] = None) -> tuple[int, int]:
    """(children at a time, torch threads each) for this comparison on `cores` CPUs: one child per run up to the
    core count, the cores split evenly (run.threads, when set, is kept)."""
    cores = cores or usable_cores()
    runs = len(run_arms(cfg)) * len(seed_layout(cfg))
    at_once = max(1, min(runs, cores))
    return at_once, cfg.run.threads or max(1, cores // at_once)


def compare_parallel(cfg: Config, *, report: bool = True, cores: Optional[int] = None) -> CompareResult:
    """Every arm (and seed, and the control) of `cfg` as a child process, then the layout, gap runs and report.
    Falls back to runner.compare (one after the other) on CUDA."""
    if uses_cuda(cfg):
        print("[bigexp] compare.parallel: on CUDA the arms run one after the other (one device; use the SLURM "
              "arrays for a device per arm)", flush=True)
        return compare(cfg, report=report)
    at_once, threads = plan(cfg, cores)
    malloc = _allocator(cfg)
    arms, seeds = run_arms(cfg), seed_layout(cfg)
    for s in seeds:  # every arm's config checked before any child starts (an expsgd twin may not exist)
        for a in arms:
            arm_cfg_for(cfg, a, world_size=1, seed=s)
    logdir = logdir_of(cfg)
    logdir.mkdir(parents=True, exist_ok=True)
    ensure_betons(cfg.data)  # once, here: the children would otherwise race to write the same files
    config_path = logdir / CONFIG_FILE
    save_resolved(cfg, config_path)
    children = [Child(seed_run(a, s), _child_argv(config_path, a, s, threads, cfg))
                for s in seeds for a in arms]
    print(f"[bigexp] compare.parallel: {len(children)} runs, {at_once} at a time, {threads} torch thread(s) each, "
          f"malloc {Path(malloc).name if malloc else 'system'}; config {config_path}", flush=True)
    completed = _run_all(children, at_once, threads, malloc)
    failed = {c.name: c.code for c in children if c.code}
    if failed:
        raise ArmProcessError(failed)
    result = CompareResult(logdir=logdir, arm_dirs={c.name: logdir / c.name for c in children})
    if completed:
        finish(cfg, arms, result, write_gap=True, report=report)
    else:
        print("[bigexp] compare.parallel: stopped by a signal, every run checkpointed; rerun the same command to "
              "resume", flush=True)
    return result


def _allocator(cfg: Config) -> Optional[str]:
    """The malloc library the children preload (None: the system's), checked before anything is written."""
    try:
        return allocator.resolve(cfg.compare.allocator)
    except LookupError as e:
        raise ConfigError(f"compare.allocator: {e}; or set compare.allocator=auto / system") from None


def _child_argv(config_path: Path, arm: str, seed: Optional[int], threads: int, cfg: Config) -> list:
    argv = [sys.executable, "-m", "bigexp", "compare", "--config", str(config_path), "--arm", arm, "--no-finish"]
    if seed is not None:
        argv += ["--seed", str(seed)]
    workers = max(1, min(cfg.data.num_workers, threads))  # FFCV's decoding threads share the same cores
    return argv + [f"run.threads={threads}", f"data.num_workers={workers}", "compare.parallel=false"]


def _run_all(children: list, at_once: int, threads: int, malloc: Optional[str] = None) -> bool:
    """Start the children (preloading `malloc`), at most `at_once` alive, until every one has ended; progress on
    stderr meanwhile. Returns False when a signal stopped them (each has checkpointed), True when all ran to
    their end."""
    env = allocator.with_preload(dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads)), malloc)
    pending, alive, lock = list(children), [], threading.Lock()
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    stopped = []

    def forward(signum, _frame):  # every child checkpoints and stops (Ctrl-C too); the parent waits for them
        stopped.append(signum)
        for c in alive:
            if c.proc and c.proc.poll() is None:
                c.proc.send_signal(signal.SIGTERM if signum == signal.SIGINT else signum)
        pending.clear()

    for s in previous:
        signal.signal(s, forward)
    try:
        last_shown = 0.0
        while pending or alive:
            while pending and len(alive) < at_once:
                child = pending.pop(0)
                _start(child, env, lock)
                alive.append(child)
            for c in [c for c in alive if c.proc.poll() is not None]:
                for t in c.threads:
                    t.join()
                c.code = c.proc.returncode
                c.status = "done" if c.code == 0 else f"FAILED ({c.code})"
                alive.remove(c)
                _print_line(f"[{c.name}] ended: {c.status}", lock)
            last_shown = _show_progress(children, lock, last_shown)
            time.sleep(0.2)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        if sys.stderr.isatty():
            sys.stderr.write("\n")
    return not stopped


def _start(child: Child, env: dict, lock: threading.Lock) -> None:
    # A process group of its own: a Ctrl-C reaches the parent only, which forwards it once (a second signal of
    # the same kind makes a child give up its checkpoint: bigexp.run.signals).
    child.proc = subprocess.Popen(child.argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  process_group=0)
    child.status = "starting"
    for stream in (child.proc.stdout, child.proc.stderr):
        t = threading.Thread(target=_pump, args=(child, stream, lock), daemon=True)
        t.start()
        child.threads.append(t)


def _pump(child: Child, stream, lock: threading.Lock) -> None:
    """A child's output, line by line: tqdm's redraws (split on \\r) become its progress status, every other line
    is printed prefixed with the run's name."""
    buf = b""
    while True:
        chunk = stream.read1(4096) if hasattr(stream, "read1") else stream.read(4096)
        if not chunk:
            break
        buf += chunk
        *parts, buf = re.split(rb"[\r\n]", buf)
        for part in parts:
            _take(child, part.decode(errors="replace"), lock)
    if buf:
        _take(child, buf.decode(errors="replace"), lock)


def _take(child: Child, text: str, lock: threading.Lock) -> None:
    m = _TQDM.search(text)
    if m:
        child.status = f"epoch {m.group(1)} {m.group(2)}/{m.group(3)}"
    elif text.strip():
        _print_line(f"[{child.name}] {text.rstrip()}", lock)


def _print_line(text: str, lock: threading.Lock) -> None:
    with lock:
        if sys.stderr.isatty():
            sys.stderr.write("\r\033[K")
        print(text, flush=True)


def _show_progress(children: list, lock: threading.Lock, last: float) -> float:
    """One status line for every run: redrawn in place on a terminal, every 30 s into a log file."""
    now = time.monotonic()
    tty = sys.stderr.isatty()
    if now - last < (0.5 if tty else 30.0):
        return last
    line = " | ".join(f"{c.name}: {c.status}" for c in children)
    with lock:
        if tty:
            sys.stderr.write("\r\033[K" + line[:max(20, _columns() - 1)])
            sys.stderr.flush()
        else:
            print(f"[bigexp] {line}", file=sys.stderr, flush=True)
    return now


def _columns() -> int:
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns
    except OSError:
        return 120
