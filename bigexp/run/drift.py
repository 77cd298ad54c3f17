"""Config drift on resume: which config keys change a run's trajectory, and the check a resume makes against them.

A checkpoint's client state holds the resolved config it was written under (`"config"`, loop._save). Resuming with
a config that differs in a key that changes what the run computes (its LR schedule, optimizer, data, model,
numerics, seed or length) would silently splice two different runs into one curve, so it is refused before any
step (ConfigError, exit 2) with every differing key as `old -> new`; `bigexp train --accept-config-change` (the
attribute `run.accept_config_change` of the config) continues with the new values, with a warning. Keys that only
change where, how often or how verbosely the run reports, stores or stops pass silently.

Every schema key has exactly one class in KEY_CLASSES below (tests/test_config_drift.py fails on a key without
one, so a new key cannot slip through unclassified); a key missing here is treated as TRAJECTORY all the same.

  TRAJECTORY  compared by value
  CONTENT     a data file: compared by the content recorded beside it (the .beton's sha256 record, taken into the
              checkpoint's manifest at save time), so a moved copy passes and a rewritten file at the same path is
              refused; by path when either side has no record
  FREE        not compared

PINNED: the load restores the optimizer's param-group hyperparameters and the scheduler's state from the
checkpoint, and ExpSGD's bookkeeping (A_t, the exponential LR) is a function of the schedule so far, so a change of
optim.* or schedule.* (or run.epochs, which stretches the schedule) would not take effect: those are refused even
with --accept-config-change; data, augmentation, model-free and engine keys are accepted with it. Checkpoints written before the manifest carried the config are not compared here.

A key present on one side only (a checkpoint from a bigexp without it, or a key since removed) is not compared: a
new key's default is the old behaviour.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Mapping, Optional

from bigexp.config import to_dict
from bigexp.data.integrity import read_sidecar
from bigexp.errors import ConfigError, DataError

TRAJECTORY, CONTENT, FREE = "trajectory", "content", "free"
# Trajectory keys the checkpoint itself restores: never accepted on a resume (see PINNED in the docstring).
PINNED_PREFIXES = ("optim.", "schedule.", "run.epochs:")

_T, _C, _F = TRAJECTORY, CONTENT, FREE
KEY_CLASSES: dict[str, str] = {
    # run: seed, length (run.epochs sets the schedule's span) and numerics change the trajectory; where the run
    # lives, when it stops early (max_steps: the schedule spans every epoch regardless), what it keeps, reports or
    # how many threads it uses do not.
    "run.name": _F, "run.out_dir": _F, "run.seed": _T, "run.epochs": _T, "run.max_steps": _F,
    "run.eval_every_epochs": _F, "run.checkpoint_every_steps": _F, "run.keep_checkpoints": _F, "run.resume": _F,
    "run.device": _T, "run.threads": _F, "run.deterministic": _T, "run.progress": _F,
    "run.accept_config_change": _F,
    # data: what is read and how it is cropped and batched. The write_* / *_source / fmnist_size keys only shape a
    # .beton that does not exist yet; what they change reaches the run through the file's content, compared as such.
    "data.dataset": _T, "data.train_source": _F, "data.val_source": _F, "data.train_beton": _C,
    "data.val_beton": _C, "data.write_missing": _F, "data.batch_size": _T, "data.num_workers": _F,
    "data.min_res": _T, "data.max_res": _T, "data.start_ramp_epoch": _T, "data.end_ramp_epoch": _T,
    "data.res_step": _T, "data.val_res": _T, "data.os_cache": _F, "data.random_crop": _T, "data.crop_scale_min": _T,
    "data.fmnist_size": _F, "data.write_max_res": _F, "data.write_jpeg_quality": _F,
    "data.write_compress_probability": _F, "data.write_mode": _F, "data.skip_corrupt": _F,
    "data.channels_last": _T,
    # model, optim, schedule, engine: every key is part of what is computed
    "model.arch": _T, "model.num_classes": _T, "model.width": _T, "model.zero_init_residual": _T,
    "model.freeze_classifier": _T, "model.norm_affine": _T, "model.bn_eps": _T, "model.channels_last": _T,
    "optim.optimizer": _T, "optim.lr": _T, "optim.lr_reference_batch": _T, "optim.momentum": _T,
    "optim.weight_decay": _T, "optim.plain_weight_decay": _T, "optim.nesterov": _T, "optim.renorm_every": _T,
    "optim.renorm_band": _T, "optim.invariance_check_tol": _T, "optim.label_smoothing": _T, "optim.twin": _T,
    "schedule.kind": _T, "schedule.milestones": _T, "schedule.gamma": _T, "schedule.warmup_epochs": _T,
    "schedule.warmup_start_factor": _T, "schedule.final_factor": _T, "schedule.weight_decay_follows_lr": _T,
    "engine.precision": _T, "engine.zero_stage": _T, "engine.grad_accum": _T,
    "engine.initial_loss_scale_power": _T, "engine.gradient_clipping": _T,
    # compiled or not, the same model and step: only kernel fusion (rounding) differs, as with run.threads
    "engine.compile": _F,
    # log: reporting only. compare: which arm directories a compare lays out and how it probes them; an arm's own
    # trajectory is in the run/optim keys that arm_config resolves for it.
    "log.tensorboard": _F, "log.every_steps": _F, "log.plots": _F,
    "compare.arms": _F, "compare.probe_every_steps": _F, "compare.probe_batch": _F, "compare.control": _F,
    "compare.seeds": _F, "compare.parallel": _F, "compare.allocator": _F,
}
# Classified ahead of their schema field (proposed or being added elsewhere); the test allows only these extras.
NOT_YET_IN_SCHEMA = frozenset()


def key_class(key: str) -> str:
    """The class of a dotted key; an unclassified one counts as TRAJECTORY (refusing is the safe side)."""
    return KEY_CLASSES.get(key, TRAJECTORY)


def flatten(config: Mapping) -> dict:
    """{"optim.lr": 0.1, ...} from the two-level dict of `bigexp.config.to_dict`."""
    return {f"{sec}.{k}": v for sec, keys in config.items() if isinstance(keys, Mapping) for k, v in keys.items()}


def _recorded_sha(path) -> Optional[str]:
    try:
        info = read_sidecar(path)
    except DataError:
        return None
    return info["sha256"] if info else None


def input_identity(config: Optional[Mapping]) -> dict:
    """{key: sha256 or None} of every CONTENT key's file, for a checkpoint's manifest (cheap: reads the records)."""
    flat = flatten(config or {})
    return {k: _recorded_sha(flat[k]) if flat[k] else None
            for k, c in KEY_CLASSES.items() if c == CONTENT and k in flat}


def _content_differs(key: str, old, new, recorded: Mapping) -> Optional[str]:
    old_sha, new_sha = recorded.get(key), _recorded_sha(new) if new else None
    if old_sha and new_sha:
        if old_sha == new_sha:
            return None
        return f"{key}: content changed ({old} sha256 {old_sha[:12]}… -> {new} sha256 {new_sha[:12]}…)"
    return None if old == new else f"{key}: {old!r} -> {new!r} (no content record to compare: paths compared)"


def config_drift(old_config: Mapping, new_config: Mapping, recorded_inputs: Optional[Mapping] = None) -> list[str]:
    """`key: old -> new` for every key that changes the trajectory and differs; [] when the resume is faithful."""
    old, new = flatten(old_config), flatten(new_config)
    out = []
    for key in sorted(old.keys() & new.keys()):
        kind = key_class(key)
        if kind == FREE:
            continue
        if kind == CONTENT:
            line = _content_differs(key, old[key], new[key], recorded_inputs or {})
            if line:
                out.append(line)
        elif old[key] != new[key]:
            out.append(f"{key}: {old[key]!r} -> {new[key]!r}")
    return out


def check_resume_config(saved: Optional[Mapping], cfg, checkpoint: Path,
                        recorded_inputs: Optional[Mapping] = None) -> None:
    """Refuse (ConfigError) to resume `checkpoint`, written under `saved`, with `cfg` when they differ in a key that
    changes the trajectory, unless cfg.run.accept_config_change (then warn). No saved config: nothing to compare."""
    if not saved:
        return
    drift = config_drift(saved, to_dict(cfg), recorded_inputs)
    if not drift:
        return
    listed = "\n".join(f"  {line}" for line in drift)
    pinned = [line for line in drift if line.startswith(PINNED_PREFIXES)]
    if getattr(cfg.run, "accept_config_change", False) and pinned:
        raise ConfigError(
            f"resuming {checkpoint}: these keys cannot change on a resume, even with --accept-config-change:\n"
            + "\n".join(f"  {line}" for line in pinned) + "\nThe optimizer's hyperparameters and the LR schedule are "
            f"restored from the checkpoint (and the exp-LR bookkeeping is a function of the schedule so far), so the "
            f"new values would not take effect. Start another run (another run.name, or --resume never).")
    if getattr(cfg.run, "accept_config_change", False):
        warnings.warn(f"resuming {checkpoint} with a changed config (accepted):\n{listed}\nthe run from here on is not "
                      f"the one its earlier steps belong to", RuntimeWarning, stacklevel=2)
        return
    raise ConfigError(
        f"resuming {checkpoint}: the config differs from the one it was written with, in keys that change the "
        f"training trajectory:\n{listed}\nResume with the checkpoint's values, start another run (another run.name, "
        f"or --resume never), or pass --accept-config-change to go on with the new ones.")
