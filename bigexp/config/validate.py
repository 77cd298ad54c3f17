"""Checking a config against the schema: per-field rules, cross-field rules, and the exp-LR math.

Every error names the full key path, the offending value, the rule, and where the value came from
(a YAML file, "command line", or "default"), e.g.

    optim.momentum = 1.5 (from configs/fmnist/step.yaml): must be < 1

All errors found are collected into one `ConfigError` (its `.errors` holds them one per item).
The exponential-LR existence condition and the batch-scaled LR are not defined here: they live in
`bigexp.optim.expmath` (pure functions, no torch) and are imported, so what validates is exactly what the
optimizer accepts. `exp_lr_bound` / `exp_lr_exists` are this package's names for expmath's functions.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from typing import Any, Mapping, Optional

from bigexp.config.schema import BIGEXP_ARCHS, Config
from bigexp.errors import ConfigError  # noqa: F401  (re-exported: raised here, caught by the CLI)
from bigexp.optim.expmath import MIN_RENORM_BAND, effective_lr, exp_form_bound, exp_form_exists

DEFAULT_SOURCE = "default"


# ----------------------------------------------------------------------------- the exp-LR rule (from expmath)

# Public names of bigexp.config since before the rule moved; the same function objects, not copies.
exp_lr_bound = exp_form_bound
exp_lr_exists = exp_form_exists


def _num(x: float) -> str:
    return f"{x:.6g}"


def _pair(a: float, b: float) -> tuple[str, str]:
    """Format two numbers with 4 significant digits, more if needed so that unequal ones differ."""
    for digits in range(4, 18):
        sa, sb = f"{a:.{digits}g}", f"{b:.{digits}g}"
        if sa != sb or a == b:
            return sa, sb
    return repr(a), repr(b)


# ----------------------------------------------------------------------------- value display

def show_value(v: Any) -> str:
    """A value the way a user would type it in YAML (strings quoted so types are visible)."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(show_value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{" + ", ".join(f"{k}: {show_value(x)}" for k, x in v.items()) + "}"
    return repr(v)


def source_label(source: str) -> str:
    return "default" if source == DEFAULT_SOURCE else f"from {source}"


def _at(path: str, value: Any, source: str) -> str:
    return f"{path} = {show_value(value)} ({source_label(source)})"


# ----------------------------------------------------------------------------- per-field rules

def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin is list or tp is list:
        args = typing.get_args(tp)
        return f"list of {_type_name(args[0])}" if args else "list"
    return getattr(tp, "__name__", str(tp))


def _kind(v: Any) -> str:
    if v is None:
        return "null"
    return "mapping" if isinstance(v, Mapping) else type(v).__name__


def _type_error(value: Any, tp: Any) -> Optional[str]:
    """None if `value` fits type `tp` (int is accepted for float; bool is not an int), else the rule."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            err = _type_error(value, inner[0])
            return None if err is None else f"expected {_type_name(tp)}, got {_kind(value)}"
        raise TypeError(f"unsupported schema type {tp}")
    if value is None:
        return f"expected {_type_name(tp)}, got null"
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif tp is str:
        ok = isinstance(value, str)
    elif origin is list or tp is list:
        if not isinstance(value, list):
            return f"expected {_type_name(tp)}, got {_kind(value)}"
        args = typing.get_args(tp)
        if args:
            for i, item in enumerate(value):
                if _type_error(item, args[0]) is not None:
                    return f"expected {_type_name(tp)}, item {i} is {_kind(item)} {show_value(item)}"
        return None
    else:
        raise TypeError(f"unsupported schema type {tp}")
    return None if ok else f"expected {_type_name(tp)}, got {_kind(value)}"


def _rule_error(value: Any, meta: Mapping[str, Any]) -> Optional[str]:
    """Bounds (gt/ge/lt/le), finiteness and choices for one scalar value that already has the right type."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            return "must be finite"
        for key, op, ok in (("gt", ">", lambda a, b: a > b), ("ge", ">=", lambda a, b: a >= b),
                            ("lt", "<", lambda a, b: a < b), ("le", "<=", lambda a, b: a <= b)):
            if key in meta and not ok(value, meta[key]):
                return f"must be {op} {meta[key]}"
    if "choices" in meta and value not in meta["choices"]:
        return "must be one of " + ", ".join(str(c) for c in meta["choices"])
    if meta.get("model_arch") and value not in BIGEXP_ARCHS:
        # bigexp.models imports torch and torchvision (5-10 s): only for a config that names a torchvision model
        from bigexp.models import arch_error
        return arch_error(value)
    return None


def field_error(value: Any, fld: dataclasses.Field, tp: Any) -> Optional[str]:
    """The rule `value` breaks for schema field `fld` of resolved type `tp`, or None if it is valid.

    For list fields the bounds and choices in the metadata apply to each item.
    """
    err = _type_error(value, tp)
    if err is not None:
        return err
    if isinstance(value, list):
        for i, item in enumerate(value):
            err = _rule_error(item, fld.metadata)
            if err is not None:
                return f"item {i} = {show_value(item)} {err}"
        return None
    return _rule_error(value, fld.metadata)


def section_types(section_cls: type) -> dict[str, tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(section_cls)
    return {fl.name: (fl, hints[fl.name]) for fl in dataclasses.fields(section_cls)}


SECTIONS: dict[str, type] = {fl.name: typing.get_type_hints(Config)[fl.name] for fl in dataclasses.fields(Config)}


def _did_you_mean(word: str, options: list[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    if close:
        return f"did you mean {prefix}{close[0]}?"
    return "valid keys: " + ", ".join(options)


def _coerce(value: Any, tp: Any) -> Any:
    """Ints given for float fields become floats, so configs compare and print consistently."""
    if tp is float or (typing.get_origin(tp) is typing.Union and float in typing.get_args(tp)):
        if isinstance(value, int) and not isinstance(value, bool):
            return float(value)
    return value


def build_config(tree: Any, source_of) -> Config:
    """A `Config` from a nested mapping, checking unknown keys, types and per-field rules.

    `source_of(path: str) -> str` says where each key path came from (for messages).
    Raises ConfigError listing every problem found. Cross-field rules are `validate`'s job.
    """
    errors: list[str] = []
    if not isinstance(tree, Mapping):
        raise ConfigError(f"config ({source_label(source_of(''))}) must be a mapping of sections "
                          f"({', '.join(SECTIONS)}), got {_kind(tree)}")
    sections = {}
    for sec_name, sec_value in tree.items():
        sec_name_s = str(sec_name)
        if sec_name_s not in SECTIONS:
            errors.append(f"{sec_name_s} ({source_label(source_of(sec_name_s))}): unknown section; "
                          + _did_you_mean(sec_name_s, list(SECTIONS)).replace("valid keys", "sections are"))
            continue
        if sec_value is None:
            sec_value = {}
        if not isinstance(sec_value, Mapping):
            errors.append(f"{_at(sec_name_s, sec_value, source_of(sec_name_s))}: "
                          f"expected a mapping of {sec_name_s}.* keys, got {_kind(sec_value)}")
            continue
        types = section_types(SECTIONS[sec_name_s])
        kwargs = {}
        for key, value in sec_value.items():
            key_s = str(key)
            path = f"{sec_name_s}.{key_s}"
            if key_s not in types:
                errors.append(f"{path} ({source_label(source_of(path))}): unknown key; "
                              + _did_you_mean(key_s, list(types), prefix=f"{sec_name_s}."))
                continue
            fld, tp = types[key_s]
            err = field_error(value, fld, tp)
            if err is not None:
                errors.append(f"{_at(path, value, source_of(path))}: {err}")
                continue
            kwargs[key_s] = _coerce(value, tp)
        sections[sec_name_s] = kwargs
    if errors:
        raise ConfigError(errors)
    return Config(**{name: SECTIONS[name](**kw) for name, kw in sections.items()})


# ----------------------------------------------------------------------------- whole-config rules

def _sources(cfg: Config) -> Mapping[str, str]:
    return getattr(cfg, "_bigexp_sources", None) or {}


def lookup_source(sources: Mapping[str, str], path: str) -> str:
    """Where `path` was set, given leaf paths -> source: the path itself, else the nearest ancestor
    that was set as a whole (a scalar where a mapping belongs), else any key below it, else "default"."""
    if not path:
        return next(iter(sources.values()), DEFAULT_SOURCE)
    parts = path.split(".")
    for n in range(len(parts), 0, -1):
        src = sources.get(".".join(parts[:n]))
        if src is not None:
            return src
    for key, src in sources.items():
        if key.startswith(path + "."):
            return src
    return DEFAULT_SOURCE


def source_of(cfg: Config, path: str) -> str:
    """Where key `path` of `cfg` was set: a YAML file, "command line", or "default"."""
    return lookup_source(_sources(cfg), path)


def _expsgd_errors(cfg: Config, at, src) -> list[str]:
    """The rules of the expsgd arm (see `validate`); at/src format a key's value and source as validate does."""
    optim, data, engine = cfg.optim, cfg.data, cfg.engine
    errors: list[str] = []
    if optim.nesterov:
        errors.append(f"{at('optim.nesterov')}: optim.optimizer = 'expsgd' ({src('optim.optimizer')}) "
                      f"refuses Nesterov momentum (the exponential-LR equivalence is for heavy-ball momentum)")
    if engine.gradient_clipping > 0:
        # the twin's gradients are A_t times the baseline's (its weights are 1/A_t larger): one threshold
        # clips the two arms at different steps, and the equivalence breaks without a sign
        errors.append(f"{at('engine.gradient_clipping')}: optim.optimizer = 'expsgd' ({src('optim.optimizer')}) "
                      "refuses gradient clipping: its gradients are scaled by A_t against the baseline's, so "
                      "clipping at the baseline's threshold silently breaks the equivalence; set "
                      "engine.gradient_clipping=0")
    if optim.renorm_band < MIN_RENORM_BAND:
        errors.append(f"{at('optim.renorm_band')}: must be >= sqrt(2) = {MIN_RENORM_BAND:.6g} with optim.optimizer "
                      f"= 'expsgd' ({src('optim.optimizer')}): renormalisation divides by a power of two, which "
                      "lands within sqrt(2) of the initial norm")
    if optim.twin == "exact" and engine.compile:
        # the exact twin writes a new Python-float eps into every absorbing norm after each step: a compiled graph
        # guards on it and would recompile at every step (or, with guards off, keep a stale eps)
        errors.append(f"{at('optim.twin')}: 'exact' with engine.compile = true ({src('engine.compile')}) is refused: "
                      "the exact twin changes the norm layers' eps (a Python float) after every step, which "
                      "torch.compile would recompile for at every step; set engine.compile=false or "
                      "optim.twin=native")
    err = exp_lr_condition_error(optim.lr, data.batch_size, optim.lr_reference_batch,
                                 optim.weight_decay, optim.momentum)
    if err is not None:
        where = ", ".join(f"{p} {src(p)}" for p in ("optim.optimizer", "optim.lr", "optim.weight_decay",
                                                     "optim.momentum"))
        errors.append(f"{err} ({where})")
    return errors


def validate(cfg: Config, *, world_size: int | None = None) -> None:
    """Raise ConfigError (listing every problem) unless `cfg` is usable.

    Re-checks every field (a Config may have been edited in code), then the cross-field rules:
    milestones sorted and within (0, run.epochs]; min_res <= max_res; end_ramp >= start_ramp;
    data.batch_size divisible by world_size × engine.grad_accum (only when world_size is given);
    expsgd refuses nesterov and gradient clipping, needs renorm_band >= √2 and ηλ <= (1-√γ)²
    (`bigexp.optim.expmath.exp_form_exists`), and refuses optim.twin = exact with engine.compile.
    """
    if not isinstance(cfg, Config):
        raise ConfigError(f"expected a bigexp Config, got {type(cfg).__name__}")
    errors: list[str] = []

    def at(path: str) -> str:
        sec, key = path.split(".")
        return _at(path, getattr(getattr(cfg, sec), key), source_of(cfg, path))

    def src(path: str) -> str:
        return source_label(source_of(cfg, path))

    for sec_name, sec_cls in SECTIONS.items():
        section = getattr(cfg, sec_name)
        if not isinstance(section, sec_cls):
            errors.append(f"{sec_name}: expected {sec_cls.__name__}, got {type(section).__name__}")
            continue
        for key, (fld, tp) in section_types(sec_cls).items():
            err = field_error(getattr(section, key), fld, tp)
            if err is not None:
                errors.append(f"{at(f'{sec_name}.{key}')}: {err}")
    if errors:  # cross-field rules assume well-typed fields
        raise ConfigError(errors)

    run, data, optim, sched, engine = cfg.run, cfg.data, cfg.optim, cfg.schedule, cfg.engine

    ms = list(sched.milestones)
    if any(b <= a for a, b in zip(ms, ms[1:])):
        errors.append(f"{at('schedule.milestones')}: must be strictly increasing")
    if ms and ms[0] <= 0:
        errors.append(f"{at('schedule.milestones')}: milestones must be > 0 (epochs)")
    if sched.kind == "step" and ms and ms[-1] > run.epochs:
        errors.append(f"{at('schedule.milestones')}: milestone {ms[-1]} is after the last epoch: must be "
                      f"<= run.epochs = {run.epochs} ({src('run.epochs')})")

    if data.min_res > data.max_res:
        errors.append(f"{at('data.min_res')}: must be <= data.max_res = {data.max_res} ({src('data.max_res')})")
    if data.end_ramp_epoch < data.start_ramp_epoch:
        errors.append(f"{at('data.end_ramp_epoch')}: must be >= data.start_ramp_epoch = "
                      f"{data.start_ramp_epoch} ({src('data.start_ramp_epoch')})")

    if world_size is not None:
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            errors.append(f"world_size = {world_size!r}: must be an int >= 1")
        else:
            per = world_size * engine.grad_accum
            if data.batch_size % per:
                errors.append(
                    f"{at('data.batch_size')}: must be divisible by world_size × engine.grad_accum = "
                    f"{world_size} × {engine.grad_accum} = {per} (engine.grad_accum {src('engine.grad_accum')}); "
                    f"{data.batch_size} / {per} = {data.batch_size / per:g} samples per rank per micro-step")

    if len(set(cfg.compare.arms)) != len(cfg.compare.arms) or not cfg.compare.arms:
        errors.append(f"{at('compare.arms')}: must be a non-empty list without repeats")

    if engine.precision == "fp16" and run.device == "cpu":
        errors.append(f"{at('engine.precision')}: fp16 needs a GPU but run.device = 'cpu' "
                      f"({src('run.device')}); use bf16 or fp32 on CPU")
    if engine.zero_stage == 3:
        errors.append(f"{at('engine.zero_stage')}: ZeRO 3 is not supported: it partitions the weights themselves "
                      "(each rank holds a slice, gathered only around forward and backward), while ExpSGD's group "
                      "norms and renormalisation, the BatchNorm-statistics rescale, checkpoints and bigexp compare "
                      "read whole weights; use 2 (gradients and optimizer state sharded), or 1")

    if optim.optimizer == "expsgd":
        errors.extend(_expsgd_errors(cfg, at, src))

    if errors:
        raise ConfigError(errors)


def exp_lr_condition_error(lr: float, batch_size: int, lr_reference_batch: Optional[int],
                           weight_decay: float, momentum: float) -> Optional[str]:
    """None if the exponential-LR form exists for these settings, else the message with the numbers.

    Uses the peak LR: schedules only scale it down (factors <= 1), and with
    `weight_decay_follows_lr` ηλ scales by the factor squared, so the peak is the binding case.
    """
    eta = effective_lr(lr, batch_size, lr_reference_batch)
    try:
        if exp_form_exists(eta, weight_decay, momentum):
            return None
    except ValueError:  # eta overflowed to inf (a huge lr × batch / reference): no exponential form either
        pass
    prod, bound = _pair(eta * weight_decay, exp_form_bound(momentum))
    if lr_reference_batch is None:
        lhs = f"optim.lr × optim.weight_decay = {_num(lr)} × {_num(weight_decay)}"
    else:
        lhs = (f"effective lr × optim.weight_decay = (optim.lr {_num(lr)} × data.batch_size {batch_size} / "
               f"optim.lr_reference_batch {lr_reference_batch} = {_num(eta)}) × {_num(weight_decay)}")
    return (f"{lhs} = {prod} > (1 − √{_num(momentum)})² = {bound}: x² − (1+γ−λη)x + γ has no real root, "
            f"so no exponential-LR equivalent exists; lower lr or weight_decay")
