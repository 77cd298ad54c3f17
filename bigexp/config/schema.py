"""The typed config schema: one dataclass per YAML section, a help string per field.

Field metadata carries what the validator checks beyond the type:
  gt / ge / lt / le   numeric bounds (exclusive / inclusive)
  choices             allowed values (for str fields; for list fields, of each item)
The cross-field checks (batch divisible by ranks x accumulation, the exponential form's existence
condition) live in `bigexp.config.validate`, which names the key path and the file it came from.

Paths: `base:` is resolved against the file that names it (`bigexp.config.load`); every path-valued key
(run.out_dir, data.train_source, data.val_source, data.train_beton, data.val_beton) is used as given, so a
relative one is taken from the WORKING DIRECTORY of the command, not from the config file's folder. The shipped
configs (data/fmnist_train.beton, runs) therefore expect to be run from the repository root.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


# Appended to the help of every path-valued key (see the module docstring).
RELATIVE_TO_CWD = ("A relative path is taken from the working directory, not from the config file's folder "
                   "(only base: is relative to the file).")


def f(default, help: str, **checks):
    """A dataclass field with a help string and validator checks in its metadata."""
    meta = {"help": help, **checks}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class RunConfig:
    name: str = f("run", "Run name; the run directory is <out_dir>/<name>.")
    out_dir: str = f("runs", "Where run directories (TensorBoard events, checkpoints, resolved config) go. "
                             + RELATIVE_TO_CWD)
    seed: int = f(0, "Seed for weights, data order and augmentation.", ge=0)
    epochs: int = f(1, "Training epochs.", gt=0)
    max_steps: Optional[int] = f(None, "Stop after this many optimizer steps (smoke tests); null = all epochs.", gt=0)
    eval_every_epochs: int = f(1, "Validate every N epochs (and always after the last).", gt=0)
    checkpoint_every_steps: Optional[int] = f(None, "Also checkpoint every N steps; null = only at epoch ends.", gt=0)
    keep_checkpoints: int = f(3, "Keep the newest K checkpoints.", gt=0)
    resume: str = f("auto", "'auto' (newest valid checkpoint in the run directory, else start), 'never', or a checkpoint path.")
    device: str = f("auto", "auto | cpu | cuda.", choices=["auto", "cpu", "cuda"])
    threads: Optional[int] = f(None, "torch CPU threads per rank; null = cores / local ranks.", gt=0)
    deterministic: bool = f(False, "Deterministic algorithms (exact resume on CPU is exact either way).")
    progress: bool = f(True, "Progress bar on rank 0.")
    accept_config_change: bool = f(False, "Resume even though a trajectory key (data, model, engine) differs from "
                                          "the checkpoint's config; optim.* and schedule.* can never change on a "
                                          "resume (bigexp/run/drift.py). Also: bigexp train --accept-config-change.")


@dataclass
class DataConfig:
    dataset: str = f("fashion_mnist", "fashion_mnist | imagenet.", choices=["fashion_mnist", "imagenet"])
    train_source: str = f("/usr/share/datasets/fashion-mnist",
                          "What `bigexp data write` reads for training: the Fashion-MNIST idx directory "
                          "(train split), or an ImageFolder root <root>/<wnid>/*.JPEG for imagenet. "
                          + RELATIVE_TO_CWD)
    val_source: str = f("/usr/share/datasets/fashion-mnist",
                        "Same for validation (Fashion-MNIST: the t10k split of that directory). " + RELATIVE_TO_CWD)
    train_beton: str = f("data/fmnist_train.beton", "FFCV file for training (written if missing and write_missing). "
                         + RELATIVE_TO_CWD)
    val_beton: str = f("data/fmnist_test.beton", "FFCV file for validation. " + RELATIVE_TO_CWD)
    write_missing: bool = f(True, "Write the .beton files from `source` when they do not exist.")
    batch_size: int = f(256, "Global batch size: across all ranks and accumulation steps.", gt=0)
    num_workers: int = f(2, "FFCV decoding threads per rank.", ge=1)
    min_res: int = f(32, "Training resolution at the start of the ramp (px).", gt=0)
    max_res: int = f(32, "Training resolution at the end of the ramp (px).", gt=0)
    start_ramp_epoch: int = f(0, "Epoch at which progressive resizing starts.", ge=0)
    end_ramp_epoch: int = f(0, "Epoch at which the resolution reaches max_res.", ge=0)
    res_step: int = f(32, "Ramp resolutions round to multiples of this (px): 32 for ImageNet as in FFCV's "
                          "recipe, 4 for 28 px Fashion-MNIST.", gt=0)
    val_res: int = f(32, "Validation resolution (centre crop with ratio 224/256 for imagenet).", gt=0)
    os_cache: bool = f(False, "Let the OS page cache hold the file (FFCV os_cache) instead of FFCV's own.")
    random_crop: bool = f(True, "Random-resized-crop + flip on train (off: centre crop, no flip).")
    crop_scale_min: float = f(0.08, "Smallest crop area fraction of random-resized-crop (torchvision/FFCV: 0.08; "
                                    "small 28-32 px images train better with ~0.35).", gt=0, le=1)
    fmnist_size: int = f(32, "Fashion-MNIST images are resized to this (px) when written.", gt=0)
    write_max_res: int = f(256, "Longest side stored when writing an ImageFolder (px).", gt=0)
    write_jpeg_quality: int = f(90, "JPEG quality when writing compressed images.", ge=1, le=100)
    write_compress_probability: float = f(0.5, "Fraction of images stored as JPEG (rest raw).", ge=0, le=1)
    write_mode: str = f("proportion", "FFCV image write mode: raw | jpg | proportion | smart.",
                        choices=["raw", "jpg", "proportion", "smart"])
    skip_corrupt: bool = f(False, "Skip unreadable images when writing, reporting how many.")
    channels_last: Optional[bool] = f(None, "Batches in channels-last memory format; null = the same as "
                                            "model.channels_last.")


# The architectures bigexp defines or has tuned configs for; `model.arch` also takes any torchvision
# classification model name (checked by `bigexp.models.arch_error`, which imports torchvision only then).
BIGEXP_ARCHS = ("resnet50", "resnet18", "preact_resnet32", "fmnist_resnet")


@dataclass
class ModelConfig:
    arch: str = f("fmnist_resnet", "resnet50 | resnet18 | preact_resnet32 | fmnist_resnet, or any torchvision "
                                   "classification model (torchvision.models.list_models(module="
                                   "torchvision.models)), built with random weights.", model_arch=True)
    num_classes: int = f(10, "Classifier outputs.", gt=0)
    width: int = f(16, "Base width of the small nets (preact_resnet32, fmnist_resnet).", gt=0)
    zero_init_residual: bool = f(False, "Zero-init the last BN gamma of each residual block.")
    freeze_classifier: bool = f(False, "Keep the classifier at its random init (the paper's option).")
    norm_affine: str = f("train", "Norm-layer gamma/beta: train | freeze | off.", choices=["train", "freeze", "off"])
    bn_eps: float = f(1e-5, "BatchNorm eps. Non-zero eps is what breaks exact scale invariance.", gt=0)
    channels_last: Optional[bool] = f(None, "Model in channels-last memory format; null = true on CUDA, false on "
                                            "CPU (there it is slower and hits oneDNN #6035, see "
                                            "bigexp/memory_format.py).")


@dataclass
class OptimConfig:
    optimizer: str = f("sgd", "sgd (baseline arm: torch SGD with weight decay) | expsgd (exponential-LR arm).",
                       choices=["sgd", "expsgd"])
    lr: float = f(0.1, "Base learning rate (peak, after warmup).", gt=0)
    lr_reference_batch: Optional[int] = f(None, "If set, lr is multiplied by batch_size / this (linear scaling).", gt=0)
    momentum: float = f(0.9, "Momentum gamma.", ge=0, lt=1)
    weight_decay: float = f(1e-4, "Weight decay lambda of the base schedule.", ge=0)
    plain_weight_decay: Optional[float] = f(None, "Weight decay for non-invariant params (norm affine, biases, "
                                                  "classifier); null = weight_decay.", ge=0)
    nesterov: bool = f(False, "Nesterov momentum (baseline only; expsgd refuses it).")
    renorm_every: int = f(100, "expsgd: renormalise invariant groups every N steps.", gt=0)
    renorm_band: float = f(16.0, "expsgd: also renormalise when a group's norm leaves [n0/band, n0*band].", gt=1)
    invariance_check_tol: float = f(1e-3, "Relative output change allowed when verifying scale invariance.", gt=0)
    label_smoothing: float = f(0.0, "Cross-entropy label smoothing.", ge=0, lt=1)
    twin: str = f("native", "expsgd: native (the norms' eps fixed: equivalent to the baseline up to eps, whose "
                            "relative weight changes with the weights' scale A_t) | exact (every absorbing norm's eps "
                            "set to eps*A_t**(-2d) and BatchNorm running stats rescaled after each step, so train- "
                            "and eval-mode outputs equal the baseline's to rounding; costs one host scalar per norm "
                            "and one in-place multiply of the running stats per step; refuses functional norms and "
                            "engine.compile). The sgd arm ignores it.", choices=["native", "exact"])


@dataclass
class ScheduleConfig:
    kind: str = f("step", "constant | step | cosine | linear (per-step base LR shape).",
                  choices=["constant", "step", "cosine", "linear"])
    milestones: list[int] = f([], "step: epochs at which LR is multiplied by gamma (increasing, in (0, run.epochs]).")
    gamma: float = f(0.1, "step: decay factor at each milestone.", gt=0, le=1)
    warmup_epochs: float = f(0.0, "Linear warmup from warmup_start_factor * lr, in epochs.", ge=0)
    warmup_start_factor: float = f(0.1, "LR factor at step 0 of warmup.", gt=0, le=1)
    final_factor: float = f(0.0, "cosine/linear: LR factor at the last step.", ge=0, le=1)
    weight_decay_follows_lr: bool = f(False, "Scale lambda_t with the LR factor too (default: constant lambda).")


@dataclass
class EngineConfig:
    precision: str = f("fp32", "fp32 | bf16 | bf16_autocast | fp16. bf16 casts the whole model, BatchNorm "
                               "statistics included, to bf16 (fp32 masters in the optimizer); bf16_autocast keeps "
                               "weights, BN statistics and optimizer fp32 and runs convs/matmuls in bf16 under "
                               "torch.autocast (what a GPU ResNet user should pick); fp16 needs a GPU (dynamic loss "
                               "scaling).", choices=["fp32", "bf16", "bf16_autocast", "fp16"])
    zero_stage: int = f(0, "DeepSpeed ZeRO stage: 0, 1 (fp32 masters and optimizer state sharded over ranks) or 2 "
                           "(gradients too); 3 is refused (it partitions the weights themselves).", ge=0, le=3)
    grad_accum: int = f(1, "Gradient accumulation steps.", gt=0)
    initial_loss_scale_power: int = f(16, "fp16: initial loss scale 2**N.", ge=0, le=32)
    gradient_clipping: float = f(0.0, "Clip global grad norm (0 = off).", ge=0)
    compile: bool = f(False, "torch.compile the model (DeepSpeed's engine.compile: in place, so checkpoints keep "
                             "the uncompiled model's keys). The LR stays outside the graph, in the optimizer, which "
                             "is not compiled. The first steps and the first eval pay the compile time.")


@dataclass
class LogConfig:
    tensorboard: bool = f(True, "Write TensorBoard events on rank 0.")
    every_steps: int = f(10, "Scalars every N optimizer steps.", gt=0)
    plots: bool = f(True, "Write PNG plots of the curves at the end.")


@dataclass
class CompareConfig:
    arms: list[str] = f(["sgd", "expsgd"], "Arms to run, by optim.optimizer value, same seed and data order.",
                        choices=["sgd", "expsgd"])
    probe_every_steps: int = f(50, "Lockstep compare: measure the equivalence gap every N steps.", gt=0)
    probe_batch: int = f(64, "Size of the fixed probe batch for the gap.", gt=0)
    control: bool = f(False, "Also run the chaos-floor control arm sgd_perturbed: the baseline from weights nudged "
                             "by a relative 1e-7 (w -> w*(1+1e-7*z)), same seed and data order; the report says "
                             "per gap metric whether the twin departs from the baseline faster than that. "
                             "Needs engine.precision fp32 and engine.zero_stage 0.")
    seeds: list[int] = f([], "Run every arm for each of these seeds (run.seed = s, run dirs <arm>/seed<s>); the "
                             "report gives mean ± sd and the paired twin − baseline difference with a 95 % "
                             "interval. [] or one seed: the single-seed layout (one seed replaces run.seed).", ge=0)
    parallel: bool = f(False, "On CPU: the runs (arms × seeds, the control) as concurrent processes of one "
                              "thread group each, the cores split among them (a small net gains ~1.3x on 2 cores: "
                              "bench/parallel_arms.py), then the gap and report. On CUDA, and under a launcher "
                              "of several ranks (they train each arm together), one after the other.")
    allocator: str = f("auto", "malloc of compare.parallel's arm processes: tcmalloc (preloaded; the main job's step "
                               "0.84x glibc's on 2 cores, same bits: bench/parallel_arms.py) | system | auto "
                               "(tcmalloc when installed, else the system's).", choices=["auto", "tcmalloc", "system"])


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    log: LogConfig = field(default_factory=LogConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
