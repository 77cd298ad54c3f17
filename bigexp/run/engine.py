"""The DeepSpeed engine: its JSON config from ours, and `build_engine` around a client optimizer.

Why the optimizer is built by us and handed to DeepSpeed as a *client* optimizer: ExpSGD must run on the fp32 masters
that DeepSpeed keeps apart from the low-precision model. Every wrapper (BF16_Optimizer, ZeRO 1 and 2, the unfused
fp16/bf16 optimizer) calls the client's `step()` on the masters and then copies them into the model, so a
renormalisation done inside `ExpSGD.step()` reaches the model by itself. A bare in-place scale of the model's weights
would be overwritten by the masters at the next step.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from bigexp.config.schema import Config
from bigexp.errors import ConfigError
from bigexp.optim.dropin import attach_deepspeed, masters_are_sharded  # noqa: F401 - masters_are_sharded re-exported
from bigexp.run.distributed import DistContext
from bigexp.run.reshard import load_resharded_optimizer
from bigexp.run.deepspeed_ops import skip_unused_ops

# engine.precision -> the dtype of the model's inputs (and of the loaders' output): the one map, used by the loop too.
# bf16_autocast: fp32 weights, inputs and BatchNorm statistics; torch.autocast runs convs and matmuls in bf16.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "bf16_autocast": torch.float32}


# torch.compile's backend for engine.compile: an internal knob, not a config key. Tests set "eager" or "aot_eager"
# (dynamo's tracing and guards without inductor's minutes of C++ compilation on 2 cores); runs use inductor.
COMPILE_BACKEND_ENV = "BIGEXP_COMPILE_BACKEND"
DEFAULT_COMPILE_BACKEND = "inductor"


def compile_backend() -> str:
    """The torch.compile backend engine.compile uses: $BIGEXP_COMPILE_BACKEND, else inductor."""
    return os.environ.get(COMPILE_BACKEND_ENV) or DEFAULT_COMPILE_BACKEND


def precision_dtype(precision: str) -> torch.dtype:
    """The torch dtype of an `engine.precision` value ('fp32', 'bf16', 'fp16')."""
    return DTYPES[precision]


def micro_batch_size(cfg: Config, world_size: int) -> int:
    """Samples per rank per micro-step: data.batch_size (global, per optimizer step) over ranks and accumulation.
    `bigexp.config.validate` has checked that it divides evenly."""
    return cfg.data.batch_size // (world_size * cfg.engine.grad_accum)


# DeepSpeed ZeRO's gradient buckets default to 5e8 elements (2 GB in fp32), and ZeRO 1/2 allocate one with
# torch.empty every micro-step on CPU; under run.deterministic torch fills every torch.empty with NaN, which cost
# 0.23 s a step on a 78k-parameter net (30 of a test's 38 s of steps). A bucket of the model's own size still
# reduces every gradient in one piece, the same collectives, for any model below the default.
ZERO_DEFAULT_BUCKET = 500_000_000


def zero_bucket_size(model_numel: int) -> int:
    """ZeRO's reduce / all-gather bucket (elements) for a model of `model_numel` parameters."""
    return int(max(1, min(ZERO_DEFAULT_BUCKET, model_numel)))


def deepspeed_config(cfg: Config, *, world_size: int, model_numel: Optional[int] = None) -> dict:
    """DeepSpeed's JSON config for one run. Batch sizes are checked by `bigexp.config.validate` beforehand.
    model_numel: the model's parameter count, which sizes ZeRO's buckets (None: DeepSpeed's default)."""
    eng = cfg.engine
    micro = micro_batch_size(cfg, world_size)
    ds: dict = {
        "train_batch_size": cfg.data.batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": eng.grad_accum,
        "steps_per_print": 10**12,  # we log ourselves
        "wall_clock_breakdown": False,
        # ExpSGD and torch SGD are not on DeepSpeed's list of ZeRO-tested optimizers; both are elementwise
        # (plus ExpSGD's group norm, which goes through an all-reduce under sharding), so ZeRO 1 and 2 are safe:
        # both hand the client optimizer flat fp32 partitions; 2 also keeps only each rank's gradient partition.
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": eng.zero_stage},
        "gradient_clipping": eng.gradient_clipping,
    }
    if eng.zero_stage and model_numel is not None:
        bucket = zero_bucket_size(model_numel)
        ds["zero_optimization"].update(reduce_bucket_size=bucket, allgather_bucket_size=bucket)
    if eng.precision == "bf16":
        ds["bf16"] = {"enabled": True}
        # DeepSpeed 0.19.8 leaves buffers fp32 while casting params to bf16; BatchNorm then fails with
        # "expected scalar type BFloat16 but found Float". Casting buffers keeps BN in one dtype.
        ds["data_types"] = {"buffer_dtype": "bf16"}
        if eng.zero_stage == 1:
            # fp32 gradient accumulation selects BF16_Optimizer (flat fp32 master shards). ZeRO 2 keeps DeepSpeed's
            # ZeRO optimizer, its gradients accumulated in the model's dtype (DeepSpeed's default).
            ds["data_types"]["grad_accum_dtype"] = "fp32"
    elif eng.precision == "bf16_autocast":
        # DeepSpeed's torch-autocast mode: the model, its BN running statistics and the optimizer stay fp32 (ExpSGD
        # renormalises fp32 weights, no master copy); only Conv/Linear run in bf16 inside torch.autocast.
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    elif eng.precision == "fp16":
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": eng.initial_loss_scale_power,
                      "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1}
    return ds


@dataclass
class Engine:
    """The DeepSpeed engine plus what the loop needs beside it."""
    ds: object                      # deepspeed.DeepSpeedEngine
    client_optimizer: torch.optim.Optimizer
    scheduler: object               # bigexp.optim.schedules.ParamGroupScheduler
    dtype: torch.dtype              # dtype the model's inputs must have
    sharded: bool

    def loss_scale(self) -> float | None:
        opt = self.ds.optimizer
        for attr in ("cur_scale", "loss_scale"):
            v = getattr(opt, attr, None)
            if isinstance(v, (int, float)):
                return float(v)
        return None

    def load_checkpoint(self, path: Path, saved_world_size: int | None) -> tuple:
        """DeepSpeed's load of checkpoint directory `path` (weights, optimizer, scheduler): (load path or None, client
        state). Sharded optimizer state written by another number of ranks is cut anew for this one
        (`bigexp.run.reshard`), which DeepSpeed refuses; unsharded state (ZeRO 0) is whole on every rank anyway."""
        path = Path(path)
        cut = self.sharded and saved_world_size is not None and saved_world_size != self.ds.dp_world_size
        load_path, client = self.ds.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=not cut,
                                                    load_lr_scheduler_states=True)
        if cut and load_path is not None:
            load_resharded_optimizer(self.ds, path, saved_world_size)
        return load_path, client


def build_engine(cfg: Config, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 make_scheduler: Callable[[torch.optim.Optimizer], object], ctx: DistContext) -> Engine:
    """Wrap model + client optimizer in a DeepSpeed engine; wire ExpSGD's norm reduction when masters are sharded."""
    import deepspeed  # seconds to import: only here, so `bigexp --help` and config errors stay fast

    skip_unused_ops()   # no g++ build of an op training never calls (see bigexp.run.deepspeed_ops)

    if cfg.engine.precision == "fp16" and ctx.device.type != "cuda":
        raise ConfigError("engine.precision = fp16 needs a GPU (DeepSpeed's fp16 path has no CPU kernels); "
                         "use bf16 on CPU")
    # DeepSpeed broadcasts params as byte views and flattens them into shards: both need contiguous storage, so
    # channels-last weights are made contiguous here. Inputs stay channels-last, which still picks NHWC kernels.
    with torch.no_grad():
        for p in model.parameters():
            # is_contiguous() ignores size-1 dims, but a 1x1 conv in channels-last still has stride(-1) != 1.
            if not p.data.is_contiguous() or (p.dim() > 0 and p.stride(-1) != 1):
                p.data = p.data.clone(memory_format=torch.contiguous_format)
    ds_cfg = deepspeed_config(cfg, world_size=ctx.world_size, model_numel=sum(p.numel() for p in model.parameters()))
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=make_scheduler, config=ds_cfg, dist_init_required=False)
    if cfg.engine.compile:
        compile_model(engine)
    sharded = attach_deepspeed(engine, optimizer, ctx.all_reduce_sum)   # the same call a user's script makes
    if sharded and not hasattr(optimizer, "norm_reduce"):  # torch SGD: optim.build.group_stats logs whole-group norms
        optimizer.norm_reduce = ctx.all_reduce_sum
    return Engine(ds=engine, client_optimizer=optimizer, scheduler=scheduler,
                  dtype=precision_dtype(cfg.engine.precision), sharded=sharded)


def compile_model(engine) -> None:
    """engine.compile = true: DeepSpeed's `engine.compile`, which calls `nn.Module.compile` on the engine's module.

    Why this and not `torch.compile(model)` before `deepspeed.initialize`: nn.Module.compile compiles IN PLACE
    (the module's forward goes through the compiled graph, the module object stays), so `engine.ds.module`,
    its state_dict keys (no `_orig_mod.` prefix: checkpoints load into an uncompiled model and back), the
    invariance groups, the BatchNorm-rescale hook and the probes all see the very same module. An
    OptimizedModule wrapper would have renamed every key and hidden the BN layers behind `_orig_mod`.

    Only the forward (and the backward autograd derives from it) is compiled: the optimizer step, and with it the
    LR, the renormalisation and the exp-LR bookkeeping, stay eager Python, so a new LR every step changes no
    graph. The renormalisation scales weights and BN statistics in place (same tensors, new values): no guard
    fails. What does recompile: train vs eval mode, grad vs no_grad (the probes), a new batch shape (the last
    val batch; dynamo then marks the batch dimension dynamic) -- a bounded few graphs, not one per step.
    """
    engine.compile(backend=compile_backend())
