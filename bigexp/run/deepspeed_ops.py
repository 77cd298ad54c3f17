"""DeepSpeed ops bigexp never calls, kept from being compiled at start-up.

On a CPU accelerator DeepSpeed's comm backend builds `deepspeed_shm_comm` (g++, 30 s to 3 min on 2 cores) when the
first engine starts. That op serves only `inference_all_reduce`; training's collectives go through
torch.distributed (gloo/NCCL) either way. Its build cache is also fragile: two `ninja` versions on one machine
(a venv's 1.13 and Debian's 1.11 write incompatible build logs) rebuild it on every start that alternates between
them. Marking it incompatible in DeepSpeed's own op table makes `build_shm_op()` return None, its documented
"no such op here" path.
"""
from __future__ import annotations

UNUSED_OPS = ("deepspeed_shm_comm",)


def skip_unused_ops() -> list:
    """Mark UNUSED_OPS incompatible for this process (before the first deepspeed.initialize); the names marked."""
    import deepspeed.ops  # heavy: callers have imported deepspeed already

    table = getattr(deepspeed.ops, "__compatible_ops__", None)   # probed lazily on first access, then cached
    if not isinstance(table, dict):
        return []
    marked = [name for name in UNUSED_OPS if table.get(name)]
    for name in marked:
        table[name] = False
    return marked
