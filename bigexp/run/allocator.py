"""Which malloc the processes bigexp starts use: the system's (glibc) or gperftools' tcmalloc, preloaded.

Why: a small CPU training step allocates and frees many mid-sized tensors (activations, gradients, oneDNN
scratch); glibc's malloc returns them to the kernel and page-faults them back, tcmalloc keeps them in per-thread
caches. bench/parallel_arms.py measures it on the main job's step. The allocator is chosen when a process starts
(LD_PRELOAD), so it applies to the processes bigexp itself launches (compare.parallel's arm processes), not to the
one already running. It changes where tensors live, not what is computed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

# gperftools' tcmalloc, Debian/Ubuntu package libtcmalloc-minimal4 (or libgoogle-perftools4 for the full one).
_NAMES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")
INSTALL_HINT = "apt-get install libtcmalloc-minimal4 (launch/setup.sh does)"


def tcmalloc_path() -> Optional[str]:
    """The tcmalloc shared library on this machine, or None."""
    for d in _DIRS:
        for name in _NAMES:
            p = Path(d) / name
            if p.is_file():
                return str(p)
    return None


def resolve(choice: str) -> Optional[str]:
    """The library to preload for `choice` (system | tcmalloc | auto; None: the system allocator). Raises
    LookupError when `tcmalloc` is asked for and not installed; `auto` then falls back to the system allocator."""
    if choice == "system":
        return None
    path = tcmalloc_path()
    if path is None and choice == "tcmalloc":
        raise LookupError(f"tcmalloc is not installed (looked for {' / '.join(_NAMES)}): {INSTALL_HINT}")
    return path


def with_preload(env: dict, library: Optional[str]) -> dict:
    """`env` for a child process that preloads `library` (first, before anything the caller preloads)."""
    if not library:
        return env
    out = dict(env)
    rest = [p for p in out.get("LD_PRELOAD", "").split() if p and p != library]
    out["LD_PRELOAD"] = " ".join([library, *rest])
    return out

