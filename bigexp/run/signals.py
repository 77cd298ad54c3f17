"""Preemption: SIGUSR1/SIGTERM set a flag the loop reads at the next step boundary.

A step that never ends (a hung collective, a kernel spinning: oneDNN #6035 did that on AVX2) would never read the
flag, and `timeout`/`scancel` would only set it. So a signal also arms a watchdog: if the loop has not left within
`grace_s` seconds (BIGEXP_PREEMPT_GRACE_S, default 300: a ResNet-50 checkpoint on a slow file system fits), the
process prints every thread's stack and exits 128+signal; a second signal of the same kind exits at once.
"""
from __future__ import annotations

import faulthandler
import os
import signal
import sys
import threading


class PreemptionFlag:
    """SIGUSR1/SIGTERM -> finish the current step, checkpoint, exit (SLURM's sbatch script requeues the job)."""

    def __init__(self, grace_s: float | None = None):
        self.requested = False
        self.grace_s = float(os.environ.get("BIGEXP_PREEMPT_GRACE_S", "300")) if grace_s is None else grace_s
        self._old = {}
        self._seen: set[int] = set()
        self._watchdog: threading.Timer | None = None

    def install(self) -> None:
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread (e.g. called from a test thread)
                pass

    def _handler(self, signum, frame) -> None:
        if signum in self._seen:
            self._give_up(signum, "a second time")
        self._seen.add(signum)
        self.requested = True
        if self._watchdog is None and self.grace_s > 0:
            self._watchdog = threading.Timer(self.grace_s, self._give_up, args=(signum, f"{self.grace_s:g} s ago"))
            self._watchdog.daemon = True
            self._watchdog.start()

    @staticmethod
    def _give_up(signum: int, when: str) -> None:
        print(f"[bigexp] signal {signal.Signals(signum).name} received {when} and the current step has not "
              f"finished: exiting without a checkpoint (stacks follow)", file=sys.stderr, flush=True)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        os._exit(128 + signum)

    def restore(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        for sig, h in self._old.items():
            signal.signal(sig, h)
