"""The fixed probe batch of a comparison, and what is measured on it at a probe step.

Probes (sequential arms): train()'s step_hook (ProbeRecorder) records, at step 0 and every
compare.probe_every_steps steps, the probe batch's logits with the CURRENT weights, and the weights (flattened per
parameter; at most PROBE_MAX_NUMEL fixed coordinates of big tensors) to <arm>/probes/step_XXXXXXXX.pt. Two forwards:
  batch statistics  (train-mode BN, running stats untouched): the network function the theorem is about;
                    these give gap/max_abs_logit, gap/kl, gap/top1_agreement
  eval mode         (running statistics): what a user evaluates; gap/eval_* . Running statistics are an EMA over
                    steps where the twin's weights had a different scale A_t, so eval mode differs by
                    O(BN-momentum window x eta*lambda/(1-gamma)) even in exact arithmetic.
`compute_gap` pairs the two arms' files by step; `bigexp compare --lockstep` measures the same snapshots live.
"""
from __future__ import annotations

import zlib
from pathlib import Path
from typing import Optional

import torch

from bigexp.analysis.gap import snapshot_gap
from bigexp.atomic import atomic_open
from bigexp.config.schema import Config
from bigexp.data.loaders import build_val_loader
from bigexp.data.ensure import ensure_betons
from bigexp.errors import InputFileError
from bigexp.optim.invariance import find_scale_invariant

PROBES_DIR = "probes"
PROBE_MAX_NUMEL = 65536   # per parameter tensor: keeps a probe file small for ImageNet-size layers


def probe_batch(cfg: Config) -> torch.Tensor:
    """The first cfg.compare.probe_batch validation images (the val order is fixed): the same in every arm and
    every job. float32, CPU, in the memory format the loader makes them."""
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
        torch.set_num_threads(threads)  # ffcv resets torch's thread count when it builds loaders
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
        return set(find_scale_invariant(model, None, check=False).names("invariant"))
    except Exception:  # an untraceable model: every matrix/conv weight, as a best guess for the cosines
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
    """What one probe step records: {"step", "logits", "logits_eval", "weights", "invariant"}."""
    return {"step": int(step), **probe_logits(model, x), "weights": probe_weights(model),
            "invariant": sorted(invariant)}


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
        with atomic_open(self.dir / f"step_{global_step:08d}.pt", "wb") as fh:
            torch.save(snap, fh)
        self.steps.append(global_step)


def probe_steps(run_dir: Path) -> dict:
    """step -> probe file of one arm, by step ({} when the arm has recorded none)."""
    d = Path(run_dir) / PROBES_DIR
    if not d.is_dir():
        return {}
    out = {}
    for p in d.glob("step_*.pt"):
        try:
            out[int(p.stem.split("_")[1])] = p
        except ValueError:  # not one of ours (step_latest.pt, ...): ignore
            continue
    return dict(sorted(out.items()))


def load_probe(path: Path) -> dict:
    """One probe file; InputFileError naming it when it is truncated, corrupt or not a probe snapshot."""
    try:
        snap = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged file: RuntimeError, EOFError, UnpicklingError, ... depending on where
        raise InputFileError(f"{path}: unreadable probe file ({type(exc).__name__}: {exc}); move it away or rerun "
                             f"that arm") from None
    if not isinstance(snap, dict) or not {"logits", "logits_eval", "weights"} <= set(snap):
        raise InputFileError(f"{path}: not a probe snapshot (expected a dict with logits, logits_eval, weights)")
    return snap


def compute_gap(base_dir: Path, twin_dir: Path) -> list:
    """[{"step": s, **gap scalars}] for every probe step both arms recorded, by step."""
    pa, pb = probe_steps(base_dir), probe_steps(twin_dir)
    rows = []
    for s in sorted(set(pa) & set(pb)):
        a, b = load_probe(pa[s]), load_probe(pb[s])
        rows.append({"step": s, **snapshot_gap(a, b)})
    return rows
