"""`bigexp compare --config X [overrides]`: the step-decay (or constant-LR) baseline and its exp-LR twin.

Layout of one comparison, a single TensorBoard logdir <run.out_dir>/<run.name>/:
    <arm>/          one run per arm in compare.arms (sgd, expsgd): events, config.yaml, checkpoints, probes/
    gap/            the equivalence gap between the arms on a fixed probe batch, per probe step
    events.*.bigexp-layout   the custom-scalars layout: each metric of all arms overlaid in one chart
    report.md, plots/        written by `bigexp report` (called at the end)

Modes:
    (default)       every arm one after the other in this process (same seed, same data order), via train()
    --arm NAME      one arm only, into the same layout (SLURM: one job per arm); the gap and layout are
                    (re)written when the other arm's probes are there
    --layout-only   no training: (re)write the layout, the gap run (from the arms' probe files) and the report
    --lockstep      both arms' models stepped in ONE plain PyTorch loop on the same batches (no DeepSpeed),
                    the gap measured live every compare.probe_every_steps; --float64 to see the theorem at 1e-12

Probes (sequential arms): train()'s step_hook records, at step 0 and every compare.probe_every_steps steps, the
probe batch's logits with the CURRENT weights, and the weights (flattened per parameter; at most
PROBE_MAX_NUMEL fixed coordinates of big tensors) to <arm>/probes/step_XXXXXXXX.pt. Two forwards:
  batch statistics  (train-mode BN, running stats untouched): the network function the theorem is about;
                    these give gap/max_abs_logit, gap/kl, gap/top1_agreement
  eval mode         (running statistics): what a user evaluates; gap/eval_* . Running statistics are an EMA over
                    steps where the twin's weights had a different scale A_t, so eval mode differs by
                    O(BN-momentum window x eta*lambda/(1-gamma)) even in exact arithmetic.
"""
from __future__ import annotations

import copy
import math
import os
import shutil
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from bigexp.atomic import atomic_open
from bigexp.config.schema import Config
from bigexp.run.metrics import TBLogger

LAYOUT_FILE = "events.out.tfevents.0000000000.bigexp-layout"
GAP_FILE = "events.out.tfevents.0000000000.bigexp-gap"
GAP_RUN = "gap"
PROBES_DIR = "probes"
PROBE_MAX_NUMEL = 65536   # per parameter tensor: keeps a probe file small for ImageNet-size layers
BASELINE_ARM = "sgd"


# ---------------------------------------------------------------------------------------------- logging
def log10_scalars(values: dict) -> dict:
    """For opt/<group>/{applied_lr, effective_lr, weight_norm}: the same value as log10_<name> (TensorBoard has
    no per-chart log axis, and the twin's LR grows by orders of magnitude)."""
    out = {}
    for tag, v in values.items():
        if v is None or not tag.startswith("opt/"):
            continue
        head, _, name = tag.rpartition("/")
        if name in ("applied_lr", "effective_lr", "weight_norm"):
            v = float(v)
            if v > 0 and math.isfinite(v):
                out[f"{head}/log10_{name}"] = math.log10(v)
    return out


class CompareLogger(TBLogger):
    """TBLogger that adds opt/<group>/log10_* beside the linear values."""

    def scalars(self, step: int, values: dict) -> None:
        super().scalars(step, {**values, **log10_scalars(values)})


def custom_scalars_layout(title: str) -> dict:
    """The charts (SummaryWriter.add_custom_scalars format): tags are regexes, matched in every run of the logdir,
    so each chart overlays that metric of all arms."""
    return {
        f"compare: {title}": {
            "val top-1 (%)": ["Multiline", [r"^val/top1$"]],
            "val top-5 (%)": ["Multiline", [r"^val/top5$"]],
            "train loss": ["Multiline", [r"^train/loss$"]],
            "val loss": ["Multiline", [r"^val/loss$"]],
            "LR applied, log10 (TensorBoard has no log axis per chart)": ["Multiline", [r"^opt/.*/log10_applied_lr$"]],
            "LR applied (linear)": ["Multiline", [r"^opt/.*/applied_lr$"]],
            "effective LR = LR/|w|^2, log10": ["Multiline", [r"^opt/.*/log10_effective_lr$"]],
            "weight norm |w|, log10": ["Multiline", [r"^opt/.*/log10_weight_norm$"]],
            "weight norm |w| (linear)": ["Multiline", [r"^opt/.*/weight_norm$"]],
            "exp-LR bookkeeping log A_t": ["Multiline", [r"^opt/.*/log_A$"]],
            "throughput img/s": ["Multiline", [r"^train/img_per_s$"]],
        },
        "equivalence gap (probe batch)": {
            "max |Δ logit| (batch statistics)": ["Multiline", [r"^gap/max_abs_logit$", r"^gap/eval_max_abs_logit$"]],
            "KL(p_base || p_twin)": ["Multiline", [r"^gap/kl$", r"^gap/eval_kl$"]],
            "top-1 agreement": ["Multiline", [r"^gap/top1_agreement$", r"^gap/eval_top1_agreement$"]],
            "layer cosine (min, mean)": ["Multiline", [r"^gap/min_layer_cosine$", r"^gap/mean_layer_cosine$"]],
            "max layer direction gap |u_a - u_b|": ["Multiline", [r"^gap/max_direction_gap$"]],
            "non-invariant params: max relative difference": ["Multiline", [r"^gap/max_plain_rel_diff$"]],
        },
    }


def _write_events_atomic(target_dir: Path, final_name: str, write) -> Path:
    """Run `write(SummaryWriter)` into a private temp dir beside target_dir, then os.replace the event file to
    target_dir/final_name: rewriting the layout or the gap run never leaves a half file or a duplicate."""
    from torch.utils.tensorboard import SummaryWriter

    target_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-events-", dir=target_dir))
    try:
        w = SummaryWriter(log_dir=str(tmp))
        try:
            write(w)
        finally:
            w.close()
        files = [p for p in tmp.iterdir() if "tfevents" in p.name]
        if len(files) != 1:
            raise RuntimeError(f"expected one event file in {tmp}, found {len(files)}")
        with open(files[0], "rb+") as fh:
            os.fsync(fh.fileno())
        final = target_dir / final_name
        os.replace(files[0], final)
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_layout(logdir: Path, title: str) -> Path:
    return _write_events_atomic(Path(logdir), LAYOUT_FILE,
                                lambda w: w.add_custom_scalars(custom_scalars_layout(title)))


def read_layout(logdir: Path):
    """The custom-scalars Layout proto stored in logdir's event files (None if there is none)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.custom_scalar import layout_pb2, metadata

    for p in sorted(Path(logdir).iterdir()):
        if not (p.is_file() and "tfevents" in p.name):
            continue
        for ev in EventFileLoader(str(p)).Load():
            for v in ev.summary.value:
                if v.tag == metadata.CONFIG_SUMMARY_TAG:
                    layout = layout_pb2.Layout()
                    layout.ParseFromString(v.tensor.string_val[0])
                    return layout
    return None


# ---------------------------------------------------------------------------------------------- probes
def probe_batch(cfg: Config) -> torch.Tensor:
    """The first cfg.compare.probe_batch validation images (the val order is fixed): the same in every arm and
    every job. float32, CPU, channels-last as the loader makes them."""
    from bigexp.data.loaders import build_val_loader
    from bigexp.data.write import ensure_betons

    ensure_betons(cfg.data, progress=False)
    threads = torch.get_num_threads()
    loader = build_val_loader(cfg.data, batch_size=cfg.compare.probe_batch, rank=0, world_size=1,
                              seed=cfg.run.seed, dtype=torch.float32, device="cpu")
    it = iter(loader)
    try:
        x, _ = next(it)
        x = x.clone()
    finally:
        it.close()
        torch.set_num_threads(threads)
    return x


def invariant_param_names(model: torch.nn.Module, optimizer=None) -> set:
    """Names of the scale-invariant parameters: from the optimizer's scale_invariant groups when they hold the
    model's own tensors (fp32, no ZeRO), else from the graph analysis (no numeric check needed here)."""
    names = {id(p): n for n, p in model.named_parameters()}
    found = set()
    for g in getattr(optimizer, "param_groups", []) or []:
        if g.get("scale_invariant"):
            found |= {names[id(p)] for p in g["params"] if id(p) in names}
    if found:
        return found
    try:
        from bigexp.optim.invariance import find_scale_invariant

        return set(find_scale_invariant(model, None, check=False).names("invariant"))
    except Exception:
        return {n for n, p in model.named_parameters() if p.dim() > 1}


def _coords(name: str, numel: int) -> Optional[torch.Tensor]:
    """Fixed coordinates of a big tensor to keep (same in every arm: seeded by the parameter name)."""
    if numel <= PROBE_MAX_NUMEL:
        return None
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return torch.randperm(numel, generator=g)[:PROBE_MAX_NUMEL].sort().values


@torch.no_grad()
def probe_logits(model: torch.nn.Module, x: torch.Tensor) -> dict:
    """Logits of `x` (float64) with the model's current weights: batch statistics (train-mode BN; buffers restored
    exactly) and eval mode (running statistics). The model's train/eval flag is restored."""
    p0 = next(model.parameters())
    x = x.to(device=p0.device, dtype=p0.dtype)
    was_training = model.training
    saved = [b.detach().clone() for b in model.buffers()]
    try:
        model.train()
        batch = model(x).double().cpu()
    finally:
        for b, s in zip(model.buffers(), saved):
            b.copy_(s)
    model.eval()
    try:
        ev = model(x).double().cpu()
    finally:
        model.train(was_training)
    return {"logits": batch, "logits_eval": ev}


@torch.no_grad()
def probe_weights(model: torch.nn.Module) -> dict:
    """name -> flattened float64 copy (or its fixed subsample) of every trainable parameter."""
    out = {}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        flat = p.detach().reshape(-1)
        idx = _coords(n, flat.numel())
        if idx is not None:
            flat = flat[idx.to(flat.device)]
        out[n] = flat.double().cpu().clone()
    return out


def snapshot(model: torch.nn.Module, x: torch.Tensor, step: int, invariant: set) -> dict:
    return {"step": int(step), **probe_logits(model, x), "weights": probe_weights(model),
            "invariant": sorted(invariant)}


def _save_atomic(obj, path: Path) -> None:
    with atomic_open(path, "wb") as fh:
        torch.save(obj, fh)


class ProbeRecorder:
    """train()'s step_hook: a snapshot at step 0 and every `every` steps into <run_dir>/probes/ (rank 0 only)."""

    def __init__(self, x: torch.Tensor, run_dir: Path, every: int, enabled: bool = True):
        self.x, self.dir, self.every, self.enabled = x, Path(run_dir) / PROBES_DIR, int(every), enabled
        self._invariant = None
        self.steps: list = []

    def __call__(self, global_step: int, engine) -> None:
        if not self.enabled or global_step % self.every:
            return
        model = engine.ds.module
        if self._invariant is None:
            self._invariant = invariant_param_names(model, engine.client_optimizer)
        snap = snapshot(model, self.x, global_step, self._invariant)
        _save_atomic(snap, self.dir / f"step_{global_step:08d}.pt")
        self.steps.append(global_step)


def probe_steps(run_dir: Path) -> dict:
    d = Path(run_dir) / PROBES_DIR
    if not d.is_dir():
        return {}
    out = {}
    for p in d.glob("step_*.pt"):
        try:
            out[int(p.stem.split("_")[1])] = p
        except ValueError:
            continue
    return dict(sorted(out.items()))


def gap_between(a: dict, b: dict) -> dict:
    """Gap scalars between two snapshots (a = baseline): batch-statistics logits, eval logits, invariant layers'
    cosines/direction gaps and the largest relative difference of the non-invariant parameters."""
    from bigexp.analysis import gap as G

    inv = set(a.get("invariant", [])) & set(b.get("invariant", []))
    wa = {n: w for n, w in a["weights"].items() if n in inv}
    wb = {n: w for n, w in b["weights"].items() if n in inv}
    out = G.gap_metrics(a["logits"], b["logits"], wa, wb)
    out["gap/eval_max_abs_logit"] = G.max_abs_logit_diff(a["logits_eval"], b["logits_eval"])
    out["gap/eval_kl"] = G.kl_divergence(a["logits_eval"], b["logits_eval"])
    out["gap/eval_top1_agreement"] = G.top1_agreement(a["logits_eval"], b["logits_eval"])
    plain = [n for n in a["weights"] if n not in inv and n in b["weights"]]
    if plain:
        rel = []
        for n in plain:
            x, y = a["weights"][n], b["weights"][n]
            scale = float(x.abs().max()) if x.numel() else 0.0
            rel.append(float((x - y).abs().max()) / scale if scale > 0 else float((x - y).abs().max()))
        out["gap/max_plain_rel_diff"] = max(rel)
    return out


def compute_gap(base_dir: Path, twin_dir: Path) -> list:
    """[{"step": s, **gap scalars}] for every probe step both arms recorded, by step."""
    pa, pb = probe_steps(base_dir), probe_steps(twin_dir)
    rows = []
    for s in sorted(set(pa) & set(pb)):
        a = torch.load(pa[s], map_location="cpu", weights_only=True)
        b = torch.load(pb[s], map_location="cpu", weights_only=True)
        rows.append({"step": s, **gap_between(a, b)})
    return rows


def write_gap_run(logdir: Path, rows: list) -> Optional[Path]:
    if not rows:
        return None

    def write(w):
        for r in rows:
            for k, v in r.items():
                if k != "step" and v is not None and math.isfinite(v):
                    w.add_scalar(k, float(v), global_step=r["step"])

    return _write_events_atomic(Path(logdir) / GAP_RUN, GAP_FILE, write)


# ---------------------------------------------------------------------------------------------- sequential
@dataclass
class CompareResult:
    logdir: Path
    arm_dirs: dict                       # arm -> run directory
    results: dict = field(default_factory=dict)   # arm -> TrainResult (sgd/expsgd trained in this call), or val dict
    gap: list = field(default_factory=list)       # [{"step", "gap/..."}]
    layout_path: Optional[Path] = None
    report: object = None                # bigexp.analysis.report.ReportResult


def _arms(cfg: Config) -> list:
    arms = list(cfg.compare.arms)
    if not arms:
        raise ValueError("compare.arms is empty: name at least one of sgd, expsgd")
    if len(set(arms)) != len(arms):
        raise ValueError(f"compare.arms = {arms}: each arm at most once (they share the run directory name)")
    return arms


def logdir_of(cfg: Config) -> Path:
    return Path(cfg.run.out_dir) / cfg.run.name


def arm_cfg_for(cfg: Config, arm: str, *, world_size: Optional[int] = None) -> Config:
    """The arm's config: optim.optimizer = arm, run directory <out_dir>/<name>/<arm>."""
    from bigexp.config import arm_config

    acfg = arm_config(cfg, arm, world_size=world_size)
    acfg.run.out_dir = str(logdir_of(cfg))
    acfg.run.name = arm
    return acfg


def _finish(cfg: Config, logdir: Path, arms: list, result: CompareResult, *, write_gap: bool, report: bool) -> None:
    logdir.mkdir(parents=True, exist_ok=True)
    result.layout_path = write_layout(logdir, cfg.run.name)
    if write_gap and len(arms) >= 2:
        base = BASELINE_ARM if BASELINE_ARM in arms else arms[0]
        twin = next(a for a in arms if a != base)
        result.gap = compute_gap(logdir / base, logdir / twin)
        write_gap_run(logdir, result.gap)
    if report:
        from bigexp.analysis.report import build_report

        try:
            result.report = build_report(logdir)
        except FileNotFoundError:
            result.report = None


def compare(cfg: Config, *, arm: Optional[str] = None, layout_only: bool = False, ctx=None,
            report: bool = True) -> CompareResult:
    """Run the arms of cfg.compare.arms one after the other (or only `arm`), same seed and data order, into one
    logdir; then the gap run, the custom-scalars layout and the report. layout_only: no training."""
    from bigexp.run.loop import train

    arms = _arms(cfg)
    if arm is not None and arm not in arms:
        raise ValueError(f"--arm {arm}: not one of compare.arms = {arms}")
    logdir = logdir_of(cfg)
    result = CompareResult(logdir=logdir, arm_dirs={a: logdir / a for a in arms})
    if layout_only:
        _finish(cfg, logdir, arms, result, write_gap=True, report=report)
        return result

    if ctx is None:
        from bigexp.run.distributed import init_distributed
        ctx = init_distributed(cfg.run.device)
    to_run = [arm] if arm is not None else arms
    x = probe_batch(cfg) if ctx.is_main else None
    for a in to_run:
        acfg = arm_cfg_for(cfg, a, world_size=ctx.world_size)
        run_dir = logdir / a
        logger = CompareLogger(run_dir, enabled=acfg.log.tensorboard and ctx.is_main)
        hook = ProbeRecorder(x, run_dir, cfg.compare.probe_every_steps, enabled=ctx.is_main)
        try:
            result.results[a] = train(acfg, ctx=ctx, logger=logger, step_hook=hook)  # plots too (log.plots)
        finally:
            logger.close()
    if ctx.is_main:
        _finish(cfg, logdir, arms, result, write_gap=True, report=report)
    ctx.barrier()
    return result


# ---------------------------------------------------------------------------------------------- lockstep
@torch.no_grad()
def _evaluate(model, loader, dtype, fmt=torch.contiguous_format) -> dict:
    from bigexp.run.step import accuracy_counts

    was = model.training
    model.eval()
    loss = top1 = top5 = n = 0.0
    for x, y in loader:
        logits = model(x.to(dtype).contiguous(memory_format=fmt)).double()
        loss += float(F.cross_entropy(logits, y, reduction="sum"))
        t1, t5 = accuracy_counts(logits, y)
        top1, top5, n = top1 + t1, top5 + t5, n + y.numel()
    model.train(was)
    n = max(n, 1.0)
    return {"val/loss": loss / n, "val/top1": 100.0 * top1 / n, "val/top5": 100.0 * top5 / n}


def lockstep(cfg: Config, *, float64: bool = False, report: bool = True, progress: Optional[bool] = None) -> CompareResult:
    """Both arms in one process and one plain PyTorch loop (no DeepSpeed), on the very same batches; the gap is
    measured in place every compare.probe_every_steps steps (and at step 0 and the last step). float64: the
    models and inputs in double precision, so the gap shows what is left of the theorem beyond rounding."""
    from bigexp.config import save_resolved
    from bigexp.data.loaders import build_train_loader, build_val_loader
    from bigexp.data.write import ensure_betons
    from bigexp.models import build_model
    from bigexp.optim.build import build_optimizer, group_stats
    from bigexp.optim.schedules import ParamGroupScheduler, build_schedule

    arms = _arms(cfg)
    logdir = logdir_of(cfg)
    logdir.mkdir(parents=True, exist_ok=True)
    progress = cfg.run.progress if progress is None else progress
    dtype = torch.float64 if float64 else torch.float32
    threads = cfg.run.threads or max(1, os.cpu_count() or 1)
    torch.set_num_threads(threads)
    ensure_betons(cfg.data, progress=progress)
    train_loader = build_train_loader(cfg.data, batch_size=cfg.data.batch_size, rank=0, world_size=1,
                                      seed=cfg.run.seed, dtype=torch.float32, device="cpu")
    val_loader = build_val_loader(cfg.data, batch_size=cfg.data.batch_size, rank=0, world_size=1,
                                  seed=cfg.run.seed, dtype=torch.float32, device="cpu")
    torch.set_num_threads(threads)
    x_probe = probe_batch(cfg).to(dtype)
    spe = len(train_loader)
    total = cfg.run.epochs * spe
    if cfg.run.max_steps:
        total = min(total, cfg.run.max_steps)

    torch.manual_seed(cfg.run.seed)
    base_model = build_model(cfg.model).to(dtype)
    # float64 BatchNorm has no fast channels-last kernel on CPU (~50x slower): plain NCHW there.
    fmt = torch.channels_last if cfg.model.channels_last and not float64 else torch.contiguous_format
    base_model = base_model.to(memory_format=fmt)
    res = min(cfg.data.val_res, 64)
    example = torch.randn(4, 3, res, res, dtype=dtype, generator=torch.Generator().manual_seed(cfg.run.seed))
    example = example.contiguous(memory_format=fmt)
    x_probe = x_probe.contiguous(memory_format=fmt)
    state = {}
    for a in arms:
        acfg = arm_cfg_for(cfg, a)
        run_dir = logdir / a
        run_dir.mkdir(parents=True, exist_ok=True)
        save_resolved(acfg, run_dir / "config.yaml")
        model = copy.deepcopy(base_model)
        built = build_optimizer(acfg, model, example)
        sched = ParamGroupScheduler(built.optimizer, build_schedule(cfg.schedule, spe, total))
        logger = CompareLogger(run_dir, enabled=cfg.log.tensorboard)
        logger.text("config", (run_dir / "config.yaml").read_text())
        logger.text("invariance", built.report.format())
        state[a] = {"model": model, "built": built, "sched": sched, "logger": logger,
                    "invariant": set(built.report.names("invariant")), "loss_sum": 0.0, "loss_n": 0,
                    "time": 0.0, "imgs": 0, "val": {}}
    base = BASELINE_ARM if BASELINE_ARM in arms else arms[0]
    twin = next((a for a in arms if a != base), None)
    gap_logger = TBLogger(logdir / GAP_RUN, enabled=cfg.log.tensorboard) if twin else None
    result = CompareResult(logdir=logdir, arm_dirs={a: logdir / a for a in arms})

    def measure(step: int) -> None:
        if twin is None:
            return
        snaps = {a: snapshot(state[a]["model"], x_probe, step, state[a]["invariant"]) for a in (base, twin)}
        row = {"step": step, **gap_between(snaps[base], snaps[twin])}
        result.gap.append(row)
        gap_logger.scalars(step, {k: v for k, v in row.items() if k != "step" and math.isfinite(v)})

    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=total, desc=f"{cfg.run.name} lockstep", dynamic_ncols=True, file=sys.stderr)
    step = 0
    measure(0)
    for s in state.values():
        s["model"].train()
    epoch = 0
    while epoch < cfg.run.epochs and step < total:
        train_loader.set_epoch(epoch)
        torch.set_num_threads(threads)
        for x, y in train_loader:
            torch.set_num_threads(threads)
            x = x.to(dtype).contiguous(memory_format=fmt)
            for a, s in state.items():
                t0 = time.perf_counter()
                loss = F.cross_entropy(s["model"](x), y, label_smoothing=cfg.optim.label_smoothing)
                s["built"].optimizer.zero_grad(set_to_none=True)
                loss.backward()
                s["built"].optimizer.step()
                s["sched"].step()
                s["time"] += time.perf_counter() - t0
                s["imgs"] += x.shape[0]
                s["loss_sum"] += float(loss.detach())
                s["loss_n"] += 1
            step += 1
            if bar is not None:
                bar.update(1)
            if step % cfg.log.every_steps == 0 or step == total:
                for a, s in state.items():
                    stats = group_stats(s["built"].optimizer, s["built"].group_names)
                    s["logger"].scalars(step, {"train/loss": s["loss_sum"] / max(1, s["loss_n"]),
                                               "train/img_per_s": s["imgs"] / max(s["time"], 1e-9),
                                               "train/epoch": epoch + (step - epoch * spe) / spe, **stats})
                    s["loss_sum"], s["loss_n"], s["time"], s["imgs"] = 0.0, 0, 0.0, 0
            if step % cfg.compare.probe_every_steps == 0 or step == total:
                measure(step)
            if step >= total:
                break
        last = step >= total or epoch + 1 >= cfg.run.epochs
        if last or (epoch + 1) % cfg.run.eval_every_epochs == 0:
            for a, s in state.items():
                s["val"] = _evaluate(s["model"], val_loader, dtype, fmt)
                torch.set_num_threads(threads)
                s["logger"].scalars(step, s["val"])
                s["logger"].flush()
        epoch += 1
    if bar is not None:
        bar.close()
    for a, s in state.items():
        s["logger"].close()
        result.results[a] = s["val"]
        if cfg.log.plots:
            from bigexp.analysis.plots import plot_run
            plot_run(logdir / a)
    if gap_logger is not None:
        gap_logger.close()
    result.layout_path = write_layout(logdir, cfg.run.name)
    if report:
        from bigexp.analysis.report import build_report
        result.report = build_report(logdir)
    return result


# ---------------------------------------------------------------------------------------------- CLI
def add_arguments(parser) -> None:
    from bigexp.config import add_config_arguments

    add_config_arguments(parser)
    parser.add_argument("--arm", default=None, choices=["sgd", "expsgd"],
                        help="run only this arm into the comparison's layout (one SLURM job per arm)")
    parser.add_argument("--layout-only", action="store_true",
                        help="no training: (re)write the custom-scalars layout, the gap run and the report")
    parser.add_argument("--lockstep", action="store_true",
                        help="both arms in one plain PyTorch loop on the same batches (no DeepSpeed, one process)")
    parser.add_argument("--float64", action="store_true", help="--lockstep in double precision")
    parser.add_argument("--no-report", action="store_true", help="skip report.md and the plots")


def print_summary(result: CompareResult) -> None:
    print(f"\nlogdir:      {result.logdir}")
    print(f"tensorboard: tensorboard --logdir {result.logdir}")
    rep = result.report
    if rep is not None:
        print(f"report:      {rep.report_path}")
        for p in rep.plots:
            print(f"plot:        {p}")
        for s in rep.summaries:
            top1 = "—" if s.final_top1 is None else f"{s.final_top1:.2f}%"
            best = "—" if s.best_top1 is None else f"{s.best_top1:.2f}%"
            print(f"  {s.name:<8} final top-1 {top1:>7}  best {best:>7}  steps {s.steps if s.steps is not None else '—'}")
    if result.gap:
        last = result.gap[-1]
        print(f"  gap at step {last['step']}: max |Δlogit| {last['gap/max_abs_logit']:.3g}, "
              f"KL {last['gap/kl']:.3g}, top-1 agreement {last['gap/top1_agreement']:.3f}")


def run(args) -> int:
    from bigexp.config import config_from_args_or_exit
    from bigexp.run.distributed import shutdown_distributed

    cfg = config_from_args_or_exit(args, world_size=int(os.environ.get("WORLD_SIZE",
                                                                      os.environ.get("SLURM_NTASKS", 1))))
    if args.float64 and not args.lockstep:
        print("bigexp compare: --float64 needs --lockstep (DeepSpeed arms run in engine.precision)", file=sys.stderr)
        return 2
    if args.lockstep and (args.arm or args.layout_only):
        print("bigexp compare: --lockstep runs both arms together; it excludes --arm and --layout-only",
              file=sys.stderr)
        return 2
    if args.lockstep or args.layout_only:  # no process group, no DeepSpeed
        try:
            result = (lockstep(cfg, float64=args.float64, report=not args.no_report) if args.lockstep
                      else compare(cfg, layout_only=True, report=not args.no_report))
        except ValueError as e:
            print(f"bigexp compare: {e}", file=sys.stderr)
            return 2
        print_summary(result)
        return 0
    from bigexp.run.distributed import exit_process
    from bigexp.run.loop import NonFiniteLossError

    code = 0
    try:
        result = compare(cfg, arm=args.arm, report=not args.no_report)
        if os.environ.get("RANK", "0") == "0":
            print_summary(result)
    except ValueError as e:
        print(f"bigexp compare: {e}", file=sys.stderr)
        code = 2
    except NonFiniteLossError as e:
        print(f"bigexp compare: {e}", file=sys.stderr)
        code = 3
    except RuntimeError as e:
        # A checkpoint that does not fit (bigexp.run.checkpoint.CheckpointError) is bad input, like a bad config.
        if type(e).__name__ != "CheckpointError":
            raise
        print(f"bigexp compare: {e}", file=sys.stderr)
        code = 2
    shutdown_distributed()
    exit_process(code)  # past C++ destructors: see bigexp.run.distributed.exit_process (gloo abort at exit)
    return code
