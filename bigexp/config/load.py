"""Reading configs: YAML files chained through `base:`, command-line overrides, provenance per key.

    load_config("configs/fmnist/step_exp.yaml", ["optim.lr=0.2", "data.batch_size=512"])

* A file may say `base: other.yaml` (relative to that file). Bases chain recursively; the base is
  applied first, then the file on top. Mappings merge key by key; lists and scalars replace.
* Only `base:` is resolved against the file. Path-valued keys (run.out_dir, data.*_source, data.*_beton) are
  kept as written: relative ones are taken from the working directory when used (see `bigexp.config.schema`).
* Overrides `KEY.PATH=VALUE` apply last, in order; VALUE is parsed as a YAML scalar or flow list
  (`0.2`, `null`, `[30, 60]`). For str fields the text is kept as typed (`run.name=001`).
* Every key remembers which file (or "command line") set it last, so errors can say where to look.

Floats: PyYAML (YAML 1.1) reads `1e-4` as a *string*; our loader reads it as the float users mean.
Duplicate keys in one mapping (e.g. two `optim:` sections) are an error, not a silent overwrite.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import re
import sys
import typing
from typing import Any, Mapping, Sequence

import yaml

from bigexp.atomic import atomic_open
from bigexp.config.schema import Config
from bigexp.config.validate import (DEFAULT_SOURCE, SECTIONS, ConfigError, build_config, lookup_source,
                                    section_types, source_of, validate)

COMMAND_LINE = "command line"
BASE_KEY = "base"


# ----------------------------------------------------------------------------- YAML dialect

class _Loader(yaml.SafeLoader):
    """SafeLoader that reads 1e-4 as a float and refuses duplicate mapping keys."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                continue  # the base class reports unhashable keys itself
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"duplicate key {key!r} (first at line {seen[key].line + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


_Loader.yaml_implicit_resolvers = {
    first: [r for r in resolvers if r[0] != "tag:yaml.org,2002:float"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                  |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                  |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


class _Dumper(yaml.SafeDumper):
    """Block-style sections with flow-style lists (`milestones: [30, 60, 80]`), as people write them."""


_Dumper.add_representer(list, lambda dumper, data: dumper.represent_sequence(
    "tag:yaml.org,2002:seq", data, flow_style=True))


def yaml_load(text: str) -> Any:
    """Parse YAML text with the bigexp dialect (1e-4 is a float, duplicate keys are errors)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader


def _display_path(path: str) -> str:
    """Path as the user should see it: relative to the working directory when below it."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


# ----------------------------------------------------------------------------- merging with provenance

def _record(sources: dict[str, str], path: str, value: Any, source: str) -> None:
    """Mark `path` and every key below it (when `value` is a mapping) as set by `source`."""
    for k in [k for k in sources if k == path or k.startswith(path + ".")]:
        del sources[k]
    if isinstance(value, Mapping) and value:
        # Only leaves are recorded: a section's own entry would shadow the defaults of its unset keys.
        for k, v in value.items():
            _record(sources, f"{path}.{k}", v, source)
    else:
        sources[path] = source


def deep_merge(base: dict, overlay: Mapping, sources: dict[str, str], source: str, prefix: str = "") -> dict:
    """Merge `overlay` into `base` in place: mappings merge, lists and scalars replace.

    `sources` (key path -> where it was set) is updated for every key `overlay` sets.
    """
    for key, value in overlay.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and isinstance(base.get(key), Mapping):
            deep_merge(base[key], value, sources, source, prefix=path + ".")
        else:
            base[key] = copy.deepcopy(dict(value) if isinstance(value, Mapping) else value)
            _record(sources, path, value, source)
    return base


def _read_yaml_file(path: str, named_by: str | None) -> dict:
    shown = _display_path(path)
    if os.path.isdir(path):
        raise ConfigError(f"{shown}: is a directory, not a YAML config file")
    if not os.path.isfile(path):
        if named_by is None:
            raise ConfigError(f"{shown}: config file not found")
        folder = os.path.dirname(named_by) or "."
        raise ConfigError(f"{shown}: base file (named by `base:` in {named_by}) not found (`base:` paths are "
                          f"relative to the folder of the file that names them, {folder}/)")
    try:
        with open(path, encoding="utf-8") as fh:
            tree = yaml_load(fh.read())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{shown}{where}: malformed YAML: {problem}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{shown}: cannot read config file: {exc}") from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{shown}: a config file must be a mapping of sections "
                          f"({', '.join(SECTIONS)}), got {type(tree).__name__}")
    for sec, value in list(tree.items()):
        if value is None and sec in SECTIONS:
            tree[sec] = {}  # `optim:` with every key commented out means "nothing here", not "erase optim"
    return tree


def _resolve_chain(path: str, tree: dict, sources: dict[str, str], stack: list[str], named_by: str | None) -> None:
    real = os.path.realpath(path)
    if real in stack:
        cycle = " -> ".join(_display_path(p) for p in stack[stack.index(real):] + [real])
        raise ConfigError(f"{_display_path(path)}: base cycle: {cycle}")
    data = _read_yaml_file(path, named_by)
    shown = _display_path(path)
    base = data.pop(BASE_KEY, None)
    if base is not None:
        if not isinstance(base, str) or not base:
            raise ConfigError(f"base = {base!r} (from {shown}): must be a path to a YAML file "
                              f"(relative to {shown})")
        base_path = os.path.normpath(os.path.join(os.path.dirname(path), os.path.expanduser(base)))
        _resolve_chain(base_path, tree, sources, stack + [real], named_by=shown)
    deep_merge(tree, data, sources, shown)


# ----------------------------------------------------------------------------- overrides

def _field_type(path: str) -> Any:
    sec, _, key = path.partition(".")
    if sec in SECTIONS and key:
        types = section_types(SECTIONS[sec])
        if key in types:
            return types[key][1]
    return None


def _is_str_field(tp: Any) -> bool:
    return tp is str or (typing.get_origin(tp) is typing.Union and str in typing.get_args(tp))


def parse_override(text: str) -> tuple[str, Any]:
    """`"optim.lr=0.2"` -> `("optim.lr", 0.2)`. Raises ConfigError naming the bad override."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} ({COMMAND_LINE}): expected KEY=VALUE, e.g. optim.lr=0.2")
    if _is_str_field(_field_type(key)) and raw.strip() not in ("null", "~"):
        return key, raw
    try:
        value = yaml_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"override {text!r} ({COMMAND_LINE}): value is not valid YAML: {problem}") from None
    return key, value


def apply_overrides(tree: dict, overrides: Sequence[str], sources: dict[str, str]) -> dict:
    for text in overrides:
        key, value = parse_override(text)
        parts = key.split(".")
        nested: Any = value
        for part in reversed(parts):
            nested = {part: nested}
        deep_merge(tree, nested, sources, COMMAND_LINE)
    return tree


# ----------------------------------------------------------------------------- public API

def _attach_sources(cfg: Config, sources: Mapping[str, str]) -> Config:
    # Kept out of the dataclass fields so equality and to_dict see only the config itself.
    cfg.__dict__["_bigexp_sources"] = dict(sources)
    return cfg


def _from_tree(tree: Mapping, sources: Mapping[str, str]) -> Config:
    cfg = _attach_sources(build_config(tree, lambda path: lookup_source(sources, path)), sources)
    validate(cfg)
    return cfg


def load_config(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> Config:
    """Load a YAML config (following `base:` chains), apply KEY=VALUE overrides, check it.

    path None means the schema defaults. Raises ConfigError with one message naming the key path,
    value, rule and source file (or the file, for missing/malformed/cyclic files).
    World-size divisibility is not checked here: call `validate(cfg, world_size=...)` for that.
    """
    if isinstance(overrides, str):
        overrides = [overrides]
    tree: dict = {}
    sources: dict[str, str] = {}
    if path is not None:
        _resolve_chain(os.fspath(path), tree, sources, stack=[], named_by=None)
    apply_overrides(tree, overrides, sources)
    return _from_tree(tree, sources)


def from_dict(d: Mapping, source: str = "<dict>") -> Config:
    """A checked Config from a nested mapping (no `base:` handling); messages cite `source`."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"{source}: a config must be a mapping of sections, got {type(d).__name__}")
    sources: dict[str, str] = {}
    tree = deep_merge({}, d, sources, source)
    return _from_tree(tree, sources)


def arm_config(cfg: Config, arm: str, *, world_size: int | None = None) -> Config:
    """`cfg` for one arm of a comparison: a checked copy with optim.optimizer = arm.

    An sgd config whose expsgd twin breaks the existence condition is refused here, naming
    compare.arms as where the expsgd setting came from.
    """
    new = copy.deepcopy(cfg)
    new.optim.optimizer = arm
    srcs = dict(getattr(cfg, "_bigexp_sources", None) or {})
    if arm != cfg.optim.optimizer:
        srcs["optim.optimizer"] = "compare.arms"
    _attach_sources(new, srcs)
    validate(new, world_size=world_size)
    return new


def to_dict(cfg: Config) -> dict:
    """Plain nested dict of every key (defaults included); `from_dict(to_dict(c)) == c`."""
    return dataclasses.asdict(cfg)


def config_sources(cfg: Config) -> dict[str, str]:
    """`{"optim.lr": "configs/fmnist/step.yaml", ...}` for every leaf key; "default" where unset."""
    return {f"{sec}.{fl.name}": source_of(cfg, f"{sec}.{fl.name}")
            for sec in SECTIONS for fl in dataclasses.fields(getattr(cfg, sec))}


def to_yaml(cfg: Config, *, with_sources: bool = False) -> str:
    """The resolved config as YAML text; with_sources adds `# from <file>` after each key."""
    d = to_dict(cfg)
    if not with_sources:
        return yaml.dump(d, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=10**6)
    srcs = config_sources(cfg)
    lines = []
    for sec, body in d.items():
        lines.append(f"{sec}:")
        for key, value in body.items():
            text = yaml.safe_dump({key: value}, default_flow_style=True, width=10**6).strip()[1:-1]
            src = srcs[f"{sec}.{key}"]
            lines.append(f"  {text}  # {'default' if src == DEFAULT_SOURCE else 'from ' + src}")
    return "\n".join(lines) + "\n"


def save_resolved(cfg: Config, path: str | os.PathLike) -> None:
    """Write the fully resolved config (no `base:`) atomically; `load_config(path) == cfg`."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    srcs = sorted({s for s in config_sources(cfg).values() if s != DEFAULT_SOURCE})
    header = "# Resolved bigexp config (bases and overrides applied).\n"
    if srcs:
        header += "# Sources: " + ", ".join(srcs) + "\n"
    with atomic_open(path, "w") as fh:
        fh.write(header + to_yaml(cfg))


# ----------------------------------------------------------------------------- argparse helpers

def add_config_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add `--config PATH`, repeatable `--set KEY=VALUE`, and positional KEY=VALUE overrides.

    Positional overrides must come in one run (argparse limitation); use --set to mix them with options.
    """
    parser.add_argument("--config", metavar="PATH", default=None,
                        help="YAML config (may chain other files through `base:`); omitted = schema defaults")
    parser.add_argument("--set", dest="set_overrides", metavar="KEY=VALUE", action="append", default=[],
                        help="override one key, e.g. --set optim.lr=0.2 (repeatable; applied before positionals)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="overrides applied last, e.g. optim.lr=0.2 data.batch_size=512")
    return parser


def config_from_args(args: argparse.Namespace, *, world_size: int | None = None) -> Config:
    """Config from `add_config_arguments` results: --set overrides first, then positionals."""
    overrides = [*(getattr(args, "set_overrides", None) or []), *(getattr(args, "overrides", None) or [])]
    cfg = load_config(getattr(args, "config", None), overrides)
    if world_size is not None:
        validate(cfg, world_size=world_size)
    return cfg


def config_from_args_or_exit(args: argparse.Namespace, *, world_size: int | None = None) -> Config:
    """`config_from_args`, but a ConfigError prints its one message to stderr and exits with status 2.

    Under torchrun only rank 0 prints (every rank sees the same config), the others exit quietly.
    """
    try:
        return config_from_args(args, world_size=world_size)
    except ConfigError as exc:
        if os.environ.get("RANK", "0") == "0":
            print(f"bigexp: config error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
