"""One writer per run directory: a lock file beside it, `<out_dir>/.<name>.lock`, held by rank 0 of the job.

Why beside and not inside: the lock has to be taken before anything touches the run directory (choosing a
checkpoint already removes what an interrupted save left there, and a second job doing that under a live one would
delete its save in progress), yet a run refused for a bad config or bad data must leave an existing run directory
byte-identical. Beside it, the lock can come first and the run directory stays untouched. The file is removed when
the holder lets go (also at interpreter exit); a holder killed outright leaves it behind, and the next job takes it
over with a warning.

How a holder is recognised:
- `fcntl.flock` on the file: the kernel drops it when the holder's process dies, however it dies. On one host that is
  the whole story: a lock file whose flock can be taken belongs to no live process.
- the file holds JSON naming the holder (pid, host, SLURM job id, torchrun run id, start time), for the message a
  refused job prints, and its mtime is a heartbeat (touched every HEARTBEAT_S by a daemon thread).
- NFS caveat: Linux's NFS client turns flock into a lock on the server, which also works across hosts, and a dead
  client's lock goes when its lease runs out (~90 s). Filesystems mounted with local-only locks (NFS `local_lock=all`,
  Lustre `localflock`) give no protection across hosts; for them, a lock we could flock whose holder is another host
  counts as live while its heartbeat is younger than STALE_AFTER_S.
- a requeued SLURM job (the same SLURM_JOB_ID) or a torchrun restart (the same TORCHELASTIC_RUN_ID) takes its own
  lock back even from another host: the launcher only starts it again once the old processes are gone.

Under torchrun/srun only rank 0 takes the lock; every rank learns the outcome (hold_run_lock), so all of them refuse
together instead of the others waiting on a rank 0 that left.
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
import threading
import time
import warnings
import weakref
from pathlib import Path
from typing import Optional

from bigexp.errors import RunLockedError

HEARTBEAT_S = 60.0
STALE_AFTER_S = 10 * 60.0   # another host's holder silent this long is gone (10 heartbeats missed)
_NO_JOB = ("", "none")      # torchrun's TORCHELASTIC_RUN_ID is "none" when no --rdzv-id was given

# resolved lock path -> the lock this process holds (re-entrant: see acquire). Weak: a lock whose holder dropped it
# without release() (an exception through train()) is released when collected, or at interpreter exit.
_held: "weakref.WeakValueDictionary[str, RunLock]" = weakref.WeakValueDictionary()


def lock_path_for(run_dir) -> Path:
    run_dir = Path(run_dir)
    return run_dir.parent / f".{run_dir.name}.lock"


def holder_info() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "slurm_job_id": os.environ.get("SLURM_JOB_ID", ""),
            "torchelastic_run_id": os.environ.get("TORCHELASTIC_RUN_ID", ""),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


def describe(info: Optional[dict]) -> str:
    if not info:
        return "an unknown holder (lock file empty or unreadable)"
    job = f", SLURM job {info['slurm_job_id']}" if info.get("slurm_job_id") else ""
    return f"pid {info.get('pid')} on {info.get('host')}{job}, since {info.get('started')}"


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError):
        return True   # exists, another user's; or unreadable info: assume alive (refusing is the safe side)
    return True


def _same_job(a: dict, b: dict) -> bool:
    return any(a.get(k, "") not in _NO_JOB and a.get(k) == b.get(k) for k in ("slurm_job_id", "torchelastic_run_id"))


def _read(fd: int) -> Optional[dict]:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        raw = os.read(fd, 1 << 16)
        info = json.loads(raw) if raw.strip() else None
        return info if isinstance(info, dict) else None
    except (OSError, ValueError):
        return None


class RunLock:
    """The lock of one run directory. acquire() raises RunLockedError naming a live holder; release() lets go.
    Re-entrant within a process: acquiring a directory this process already holds counts up, release counts down
    (so a caller may hold it around train(), which takes it again)."""

    def __init__(self, run_dir, *, stale_after_s: float = STALE_AFTER_S, heartbeat_s: float = HEARTBEAT_S):
        self.run_dir = Path(run_dir)
        self.path = lock_path_for(run_dir)
        self.stale_after_s, self.heartbeat_s = stale_after_s, heartbeat_s
        self.fd: Optional[int] = None
        self.depth = 0
        self._stop = threading.Event()
        self._created: list[Path] = []   # parent directories this lock made (removed again when left empty)
        self._finalizer = None

    # ------------------------------------------------------------------------------------------ take
    def acquire(self) -> "RunLock":
        key = str(self.path.resolve())
        if key in _held:
            _held[key].depth += 1
            return _held[key]
        for d in [*reversed(self.path.parents)]:
            if not d.exists():
                d.mkdir(exist_ok=True)
                self._created.insert(0, d)
        for _ in range(5):  # the file can be unlinked by its releasing holder between our open and our flock
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked = True
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
                locked = False
            if locked and not self._still_linked(fd):
                os.close(fd)
                continue
            try:
                self._decide(fd, locked)
            except BaseException:
                os.close(fd)
                self._remove_created_dirs()
                raise
            break
        else:
            raise RunLockedError(f"{self.path}: could not take the lock (the file kept being replaced)")
        self.fd, self.depth = fd, 1
        self._write_info(fd)
        _held[key] = self
        self._finalizer = weakref.finalize(self, _release_fd, fd, str(self.path), os.getpid(), list(self._created),
                                           self._stop)
        # A function, not a bound method: the thread must not keep this lock alive (see _held).
        threading.Thread(target=_heartbeat, args=(self.path, self._stop, self.heartbeat_s),
                         name="bigexp-run-lock-heartbeat", daemon=True).start()
        return self

    def _still_linked(self, fd: int) -> bool:
        try:
            return os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            return False

    def _decide(self, fd: int, locked: bool) -> None:
        """Whether the lock is ours: raise RunLockedError naming a live holder, warn on taking over a stale one."""
        prev, me = _read(fd), holder_info()
        if prev is None and not locked:  # the holder may be between its flock and writing its name
            time.sleep(0.2)
            prev = _read(fd)
        if prev is None and locked:
            return
        other_host = prev is not None and prev.get("host") != me["host"]
        if not locked:  # a live process holds the flock (this host, or another over a lock-sharing filesystem)
            if other_host and _same_job(prev, me):
                warnings.warn(f"{self.path}: taking back the lock of this job's earlier run ({describe(prev)}): "
                              f"requeued or restarted", RuntimeWarning, stacklevel=3)
                return
            raise self._refusal(prev)
        age = time.time() - os.fstat(fd).st_mtime
        if other_host and age < self.stale_after_s and not _same_job(prev, me):
            raise self._refusal(prev, f" (its heartbeat is {age:.0f} s old; it counts as gone after "
                                      f"{self.stale_after_s:.0f} s)")
        why = ("this job's earlier run" if _same_job(prev, me) else
               f"silent for {age:.0f} s" if other_host else "no longer running")
        warnings.warn(f"{self.path}: taking over the stale lock of {describe(prev)} ({why})", RuntimeWarning,
                      stacklevel=3)

    def _refusal(self, prev: Optional[dict], extra: str = "") -> RunLockedError:
        return RunLockedError(
            f"{self.run_dir} is in use by {describe(prev)}{extra}; "
            f"one job per run directory. Wait for it, stop it, or use another run.name (lock file: {self.path})")

    def _write_info(self, fd: int) -> None:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder_info()).encode(), 0)
        os.fsync(fd)

    # ------------------------------------------------------------------------------------------ let go
    def release(self) -> None:
        if self.fd is None:
            return
        self.depth -= 1
        if self.depth > 0:
            return
        _held.pop(str(self.path.resolve()), None)
        self.fd = None
        self._finalizer()   # unlink, close (which drops the flock), remove the directories it made if empty

    def _remove_created_dirs(self) -> None:
        _rmdirs(self._created)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _rmdirs(dirs) -> None:
    for d in dirs:
        try:
            os.rmdir(d)
        except OSError:
            break   # not empty (the run wrote there) or gone: leave it and its parents


def _heartbeat(path: Path, stop: threading.Event, every_s: float) -> None:
    """The holder's sign of life for other hosts: the lock file's mtime, touched every `every_s`."""
    while not stop.wait(every_s):
        try:
            os.utime(path)
        except OSError:  # released meanwhile: the loop ends at the next wait
            pass


def _release_fd(fd: int, path: str, owner_pid: int, created: list, stop: threading.Event) -> None:
    """Unlink while still holding the flock (so no one can take a lock on a file about to vanish), then close.
    Runs from release(), from garbage collection of a lock never released, or at interpreter exit; a forked child
    inheriting the lock does nothing (only the process that took it lets go)."""
    if os.getpid() != owner_pid:
        return
    stop.set()
    try:
        os.unlink(path)
    except OSError:
        pass
    try:
        os.close(fd)
    except OSError:
        pass
    _rmdirs(created)


class _NotHeld:
    """What ranks other than 0 hold: nothing to release."""

    def release(self) -> None:
        pass


def hold_run_lock(run_dir, ctx) -> RunLock | _NotHeld:
    """Collective: rank 0 takes the lock of `run_dir`; every rank raises the same RunLockedError when it is refused.
    Returns what to release() when the run ends."""
    lock, refused = _NotHeld(), None
    if ctx.is_main:
        try:
            lock = RunLock(run_dir).acquire()
        except RunLockedError as exc:
            refused = str(exc)
    refused = ctx.broadcast_object(refused)
    if refused is not None:
        raise RunLockedError(refused)
    return lock
