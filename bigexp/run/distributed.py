"""Process-group setup from the launcher's environment (torchrun, the deepspeed launcher, or SLURM's srun).

One process per GPU, or CPU ranks on gloo when there is no GPU. Everything here is a thin layer over
torch.distributed so the training loop can call `dist_ctx.all_reduce_sum(...)` without caring whether it runs alone.

Device discipline: every tensor handed to a collective lives on `ctx.device` (the rank's GPU, or the CPU). On a GPU a
CPU tensor there would need a gloo group beside NCCL and costs a device->host copy; with
BIGEXP_CHECK_DEVICE=1 (or `DistContext(check_device=True)`) every collective checks it, also in a one-rank run, where
no collective runs at all, so the CPU tests catch it (tests/test_device_discipline.py).
"""
from __future__ import annotations

import datetime
import os
import socket
import sys
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.rendezvous import rendezvous

ENV_CHECK_DEVICE = "BIGEXP_CHECK_DEVICE"  # "1": DistContext.check_device on (tests; a GPU smoke run)


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")
    # Collectives refuse a tensor that is not on `device` (module docstring); off unless the env var asks.
    check_device: bool = field(default_factory=lambda: os.environ.get(ENV_CHECK_DEVICE, "") == "1")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def initialized(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    def barrier(self) -> None:
        if self.initialized and self.world_size > 1:
            dist.barrier()

    def check_on_device(self, t: torch.Tensor, what: str = "a collective's tensor") -> None:
        """With check_device: raise unless `t` is on this rank's device (a CUDA index left out matches any)."""
        if not self.check_device:
            return
        want = self.device
        if t.device.type != want.type or (want.index is not None and t.device.index != want.index):
            raise RuntimeError(f"{what} is on {t.device}, not on the rank's device {want} "
                               f"(shape {tuple(t.shape)}, {t.dtype}); create it with device=ctx.device")

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        self.check_on_device(t, "all_reduce_sum's tensor")  # before the world-size test: one-rank runs check too
        if self.initialized and self.world_size > 1:
            # gloo has no bf16/fp16 reductions on CPU: reduce in fp32 and cast back.
            if t.dtype in (torch.bfloat16, torch.float16):
                tmp = t.float()
                dist.all_reduce(tmp)
                t.copy_(tmp)
            else:
                dist.all_reduce(t)
        return t

    def broadcast_object(self, obj, src: int = 0):
        if not (self.initialized and self.world_size > 1):
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]


def process_group_backend(device_type: str) -> str:
    """The backend string for init_process_group. On GPU both: NCCL for CUDA tensors and gloo for any CPU tensor, so a
    stray CPU collective (a flag, a metric) runs instead of killing the job; `DistContext.check_device` finds them."""
    return "cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a test's or bench's own torchrun rendezvous).

    The OS picks it (bind to port 0); it can be taken again before the caller binds it, so use it at once.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env_int(*names: str, default: int) -> int:
    for n in names:
        if os.environ.get(n, "") != "":
            return int(os.environ[n])
    return default


def launcher_world_size() -> int:
    """The number of ranks the launcher started (WORLD_SIZE, else SLURM_NTASKS under a bare srun, else 1), known
    before any process group exists: config validation needs it first."""
    return _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)


def usable_cores() -> int:
    """The CPUs this process may run on: a SLURM allocation's or taskset's (sched_getaffinity), not the node's
    os.cpu_count(), which on a 64-core node with --cpus-per-task=2 would start 64 threads on 2 cores."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # no sched_getaffinity (macOS)
        return os.cpu_count() or 1


def rank_threads(requested: int, local_world_size: int) -> int:
    """torch CPU threads for this rank: `requested` (run.threads) when > 0, else the cores this process may use
    shared evenly among the node's ranks (at least 1)."""
    return requested or max(1, usable_cores() // max(1, local_world_size))


def reset_threads(n: int) -> None:
    """Set torch's CPU thread count back to n. FFCV changes it behind the caller's back (its compiler sets numba's
    and torch's thread count) when it builds loaders and on iter(loader), so call this after each of those."""
    torch.set_num_threads(n)


def agent_store_prefix(env) -> str:
    """The store key prefix a restarted torchrun worker group needs, or "" when it needs none.

    torchrun --max-restarts with the agent's shared store (TORCHELASTIC_USE_AGENT_STORE=True, torch's default): the
    new worker group talks through a store that still holds the dead group's keys (gloo/nccl addresses of every
    process group). Unprefixed, the new ranks read those and connect to dead ports: "connectFullMesh failed ...
    Connection refused", or a hang. One prefix per attempt keeps them apart; every later group (DeepSpeed's
    new_group) inherits it from the default store. The attempt is the agent's own TORCHELASTIC_RESTART_COUNT, which
    only agrees across nodes while every agent lived through every restart: a node started again counts from 0
    (pytorch#135712), so launch/torchrun_multinode.sh turns the shared store off (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1)
    and each group's rank 0 then serves a fresh store at a fresh port, with no old keys and no prefix needed.
    """
    restart = int(env.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    shared = env.get("TORCHELASTIC_USE_AGENT_STORE", "") == "True"
    return f"bigexp/attempt{restart}" if shared and restart > 0 else ""


def init_distributed(device: str = "auto") -> DistContext:
    """Initialise torch.distributed from the environment if a launcher set it up, else run as one process.

    torchrun and the deepspeed launcher set RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT; under a bare `srun`
    we read SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID and expect MASTER_ADDR/MASTER_PORT from the sbatch script.
    """
    rank = _env_int("RANK", "SLURM_PROCID", default=0)
    world = launcher_world_size()
    local_rank = _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)
    local_world = _env_int("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE", default=world)
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("run.device = cuda, but no CUDA device is visible to this process")
    if use_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        dev = torch.device("cuda", torch.cuda.current_device())
    else:
        dev = torch.device("cpu")
    # DeepSpeed reads these; under srun they are not set by the launcher.
    os.environ.setdefault("RANK", str(rank))
    os.environ.setdefault("WORLD_SIZE", str(world))
    os.environ.setdefault("LOCAL_RANK", str(local_rank))
    if not dist.is_initialized():
        # DeepSpeed wants a process group even for one rank; a free port keeps concurrent single runs apart.
        if world > 1:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", "29500")
        timeout = datetime.timedelta(minutes=int(os.environ.get("BIGEXP_DIST_TIMEOUT_MIN", "30")))
        backend = process_group_backend("cuda" if use_cuda else "cpu")
        prefix = agent_store_prefix(os.environ)
        if world == 1:
            # DeepSpeed wants a process group even for one rank. An in-process store needs no port: an inherited
            # MASTER_PORT (a parent that ran a group of its own, a test runner) cannot collide with it.
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        elif prefix:
            store, _, _ = next(rendezvous("env://", rank, world, timeout=timeout))
            store = dist.PrefixStore(prefix, store)
            dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world, timeout=timeout)
        else:
            dist.init_process_group(backend=backend, rank=rank, world_size=world, timeout=timeout)
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, local_world_size=local_world, device=dev)


def shutdown_distributed() -> None:
    """Leave the process group cleanly.

    A barrier first, so no rank tears down gloo while another still sends (the cause of the
    `terminate called without an active exception` aborts seen at exit with deepspeed 0.19.8 on gloo).
    """
    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def exit_process(code: int) -> None:
    """Exit without running C++ static destructors.

    With deepspeed 0.19.8 on gloo, ~13% of 2-rank runs aborted at interpreter exit with `terminate called without an
    active exception` after a clean `destroy_process_group`, turning a finished run red. Everything we own is
    flushed and closed by now, so skipping the destructors loses nothing.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
