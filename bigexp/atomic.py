"""Atomic file writes: readers see the old file or the new one, never half of either.

Write to a temp file in the same directory (os.replace is atomic only within a filesystem), fsync it, rename it into
place, then fsync the directory so the rename itself survives a crash. On any error the temp file is removed.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def fsync_dir(directory) -> None:
    try:
        fd = os.open(os.fspath(directory), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # some filesystems refuse fsync on a directory; the rename is still atomic
        pass


@contextlib.contextmanager
def atomic_open(path, mode: str = "w"):
    """`with atomic_open(p, "wb") as fh: ...` — fh is a temp file that becomes `p` when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def write_text_atomic(path, text: str) -> None:
    with atomic_open(path, "w") as fh:
        fh.write(text)
