"""bigexp.config: base chains, overrides, provenance, validation rules, the exp-LR existence math, the CLI."""
from __future__ import annotations

import argparse
import dataclasses
import glob
import math
import os
import subprocess
import sys
import textwrap
import typing

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bigexp.config import (Config, ConfigError, add_config_arguments, arm_config, config_from_args, config_from_args_or_exit,
                           exp_lr_bound, exp_lr_exists, from_dict, load_config, save_resolved, to_dict, validate)
from bigexp.config.schema import (CompareConfig, DataConfig, EngineConfig, LogConfig, ModelConfig, OptimConfig,
                                  RunConfig, ScheduleConfig)

from conftest import REPO
CONFIG_FILES = sorted(glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"), recursive=True))


def write(root, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = os.path.join(root, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as fh:
            fh.write(textwrap.dedent(text))


@pytest.fixture
def here(tmp_path, monkeypatch):
    """Work inside tmp_path so messages show short relative paths, as they would for a user."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


# ----------------------------------------------------------------------------- bases and merging

def test_base_chain_deep_merge(here):
    write(here, {
        "b/root.yaml": """
            run: {epochs: 10, name: root}
            optim: {lr: 0.3, momentum: 0.5, weight_decay: 1e-4}
            schedule: {kind: step, milestones: [2, 4, 6]}
            """,
        "b/mid.yaml": """
            base: root.yaml
            optim: {lr: 0.2}
            schedule: {milestones: [5]}
            """,
        "a/leaf.yaml": """
            base: ../b/mid.yaml
            run: {name: leaf}
            data: {batch_size: 64}
            """,
    })
    cfg = load_config("a/leaf.yaml")
    assert cfg.run.name == "leaf" and cfg.run.epochs == 10        # mapping merged across 3 files
    assert cfg.optim.lr == 0.2 and cfg.optim.momentum == 0.5       # sibling keys survive a partial override
    assert cfg.optim.weight_decay == 1e-4                          # 1e-4 is a float, not PyYAML's string
    assert isinstance(cfg.optim.weight_decay, float)
    assert cfg.schedule.milestones == [5]                          # lists replace, never concatenate
    assert cfg.data.batch_size == 64 and cfg.data.num_workers == DataConfig().num_workers  # defaults fill in


def test_int_given_for_float_becomes_float(here):
    write(here, {"c.yaml": "optim: {lr: 1}\n"})
    cfg = load_config("c.yaml")
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)


def test_empty_section_and_empty_file_mean_nothing_set(here):
    write(here, {"base.yaml": "optim: {lr: 0.3}\n", "c.yaml": "base: base.yaml\noptim:\n", "e.yaml": ""})
    assert load_config("c.yaml").optim.lr == 0.3    # an all-commented section does not erase the base's
    assert load_config("e.yaml") == Config()


def test_none_path_gives_defaults_plus_overrides():
    cfg = load_config(None, ["optim.lr=0.25"])
    assert cfg.optim.lr == 0.25 and dataclasses.replace(cfg, optim=OptimConfig(lr=0.1)) == Config()


# ----------------------------------------------------------------------------- overrides

def test_overrides_win_positional_after_set(here):
    write(here, {"c.yaml": "optim: {lr: 0.3}\ndata: {batch_size: 64}\nrun: {name: x}\n"})
    parser = add_config_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--config", "c.yaml", "--set", "optim.lr=0.2", "--set", "data.batch_size=512",
                              "optim.lr=0.05", "schedule.milestones=[1]", "run.name=007", "run.max_steps=null"])
    cfg = config_from_args(args)
    assert cfg.optim.lr == 0.05                     # positional applied after --set
    assert cfg.data.batch_size == 512               # --set beats the file
    assert cfg.schedule.milestones == [1]           # flow lists parse
    assert cfg.run.name == "007"                    # str fields keep the text as typed
    assert cfg.run.max_steps is None


def test_override_names_command_line_and_key(here):
    write(here, {"c.yaml": "optim: {lr: 0.3}\n"})
    with pytest.raises(ConfigError) as err:
        load_config("c.yaml", ["optim.momentum=1.5"])
    assert str(err.value) == "optim.momentum = 1.5 (from command line): must be < 1"


# ----------------------------------------------------------------------------- provenance

def test_provenance_names_the_file_that_set_the_key(here):
    write(here, {
        "configs/b/base.yaml": "optim: {momentum: 1.5, lr: 0.1}\n",
        "configs/a/step.yaml": "base: ../b/base.yaml\noptim: {lr: 0.2}\n",
        "configs/a/fixed.yaml": "base: step.yaml\noptim: {momentum: 2.0}\n",
    })
    with pytest.raises(ConfigError) as err:
        load_config("configs/a/step.yaml")
    assert str(err.value) == f"optim.momentum = 1.5 (from {os.path.join('configs', 'b', 'base.yaml')}): must be < 1"
    with pytest.raises(ConfigError) as err:
        load_config("configs/a/fixed.yaml")
    assert f"optim.momentum = 2.0 (from {os.path.join('configs', 'a', 'fixed.yaml')})" in str(err.value)


def test_cross_field_message_names_both_sources(here):
    write(here, {"base.yaml": "data: {batch_size: 100}\n", "c.yaml": "base: base.yaml\nengine: {grad_accum: 3}\n"})
    cfg = load_config("c.yaml")            # fine without a world size
    with pytest.raises(ConfigError) as err:
        validate(cfg, world_size=2)
    msg = str(err.value)
    assert msg.startswith("data.batch_size = 100 (from base.yaml): must be divisible by world_size × "
                          "engine.grad_accum = 2 × 3 = 6 (engine.grad_accum from c.yaml)"), msg


def test_collects_every_error_in_one_message(here):
    write(here, {"c.yaml": "optim: {lr: -1, momentum: 2}\nrun: {epochs: 0}\n"})
    with pytest.raises(ConfigError) as err:
        load_config("c.yaml")
    assert len(err.value.errors) == 3
    for key in ("optim.lr = -1", "optim.momentum = 2", "run.epochs = 0"):
        assert key in str(err.value)


# ----------------------------------------------------------------------------- every bad config, refused

BAD = [
    # id, files, path, overrides, world_size, substrings the one message must contain
    ("unknown-section", {"c.yaml": "optimm: {lr: 0.1}\n"}, "c.yaml", [], None,
     ["optimm (from c.yaml)", "unknown section", "did you mean optim?"]),
    ("unknown-nested", {"c.yaml": "optim: {lrr: 0.1}\n"}, "c.yaml", [], None,
     ["optim.lrr (from c.yaml)", "unknown key", "did you mean optim.lr?"]),
    ("unknown-override", {"c.yaml": "{}\n"}, "c.yaml", ["data.batchsize=3"], None,
     ["data.batchsize (from command line)", "did you mean data.batch_size?"]),
    ("wrong-type", {"c.yaml": "data: {batch_size: big}\n"}, "c.yaml", [], None,
     ["data.batch_size = 'big' (from c.yaml)", "expected int, got str"]),
    ("bool-not-int", {"c.yaml": "data: {batch_size: true}\n"}, "c.yaml", [], None,
     ["data.batch_size = true (from c.yaml)", "expected int, got bool"]),
    ("float-not-int", {"c.yaml": "data: {batch_size: 128.0}\n"}, "c.yaml", [], None,
     ["data.batch_size = 128.0", "expected int, got float"]),
    ("null-not-optional", {"c.yaml": "optim: {lr: null}\n"}, "c.yaml", [], None,
     ["optim.lr = null (from c.yaml)", "expected float, got null"]),
    ("list-item-type", {"c.yaml": "schedule: {milestones: [3, x]}\n"}, "c.yaml", [], None,
     ["schedule.milestones = [3, 'x'] (from c.yaml)", "list of int"]),
    ("negative-lr", {"c.yaml": "optim: {lr: -0.1}\n"}, "c.yaml", [], None,
     ["optim.lr = -0.1 (from c.yaml): must be > 0"]),
    ("nan-lr", {"c.yaml": "optim: {lr: .nan}\n"}, "c.yaml", [], None, ["optim.lr = nan", "must be finite"]),
    ("momentum-1", {"c.yaml": "optim: {momentum: 1.0}\n"}, "c.yaml", [], None,
     ["optim.momentum = 1.0 (from c.yaml): must be < 1"]),
    ("renorm-every-0", {"c.yaml": "optim: {renorm_every: 0}\n"}, "c.yaml", [], None,
     ["optim.renorm_every = 0 (from c.yaml): must be > 0"]),
    ("bad-choice", {"c.yaml": "optim: {optimizer: adam}\n"}, "c.yaml", [], None,
     ["optim.optimizer = 'adam' (from c.yaml): must be one of sgd, expsgd"]),
    ("bad-list-choice", {"c.yaml": "compare: {arms: [sgd, adam]}\n"}, "c.yaml", [], None,
     ["compare.arms", "item 1 = 'adam' must be one of sgd, expsgd"]),
    ("section-not-mapping", {"c.yaml": "optim: 3\n"}, "c.yaml", [], None,
     ["optim = 3 (from c.yaml)", "expected a mapping"]),
    ("batch-not-divisible", {"c.yaml": "data: {batch_size: 100}\nengine: {grad_accum: 3}\n"}, "c.yaml", [], 2,
     ["data.batch_size = 100 (from c.yaml)", "engine.grad_accum", "2 × 3 = 6"]),
    ("exp-bound", {"c.yaml": "optim: {optimizer: expsgd, lr: 0.5, weight_decay: 0.1, momentum: 0.9}\n"},
     "c.yaml", [], None,
     ["optim.lr × optim.weight_decay = 0.5 × 0.1 = 0.05 > (1 − √0.9)² = 0.002633: x² − (1+γ−λη)x + γ has no "
      "real root, so no exponential-LR equivalent exists; lower lr or weight_decay", "optim.lr from c.yaml"]),
    ("exp-bound-scaled-lr", {"c.yaml": "optim: {optimizer: expsgd, lr: 0.1, weight_decay: 0.005, "
                                       "lr_reference_batch: 256}\ndata: {batch_size: 2048}\n"}, "c.yaml", [], None,
     ["effective lr", "data.batch_size 2048", "optim.lr_reference_batch 256 = 0.8", "= 0.004 > (1 − √0.9)²"]),
    ("exp-nesterov", {"c.yaml": "optim: {optimizer: expsgd, nesterov: true}\n"}, "c.yaml", [], None,
     ["optim.nesterov = true (from c.yaml)", "refuses Nesterov"]),
    ("milestones-unsorted", {"c.yaml": "run: {epochs: 9}\nschedule: {milestones: [6, 3]}\n"}, "c.yaml", [], None,
     ["schedule.milestones = [6, 3] (from c.yaml): must be strictly increasing"]),
    ("milestone-after-end", {"c.yaml": "run: {epochs: 5}\nschedule: {kind: step, milestones: [3, 6]}\n"},
     "c.yaml", [], None, ["schedule.milestones = [3, 6] (from c.yaml)", "<= run.epochs = 5 (from c.yaml)"]),
    ("milestone-zero", {"c.yaml": "run: {epochs: 5}\nschedule: {milestones: [0, 2]}\n"}, "c.yaml", [], None,
     ["schedule.milestones = [0, 2]", "must be > 0"]),
    ("min-res-above-max", {"c.yaml": "data: {min_res: 64, max_res: 32}\n"}, "c.yaml", [], None,
     ["data.min_res = 64 (from c.yaml): must be <= data.max_res = 32 (from c.yaml)"]),
    ("ramp-backwards", {"c.yaml": "data: {start_ramp_epoch: 5, end_ramp_epoch: 2}\n"}, "c.yaml", [], None,
     ["data.end_ramp_epoch = 2 (from c.yaml): must be >= data.start_ramp_epoch = 5"]),
    ("fp16-on-cpu", {"c.yaml": "engine: {precision: fp16}\nrun: {device: cpu}\n"}, "c.yaml", [], None,
     ["engine.precision = 'fp16'", "needs a GPU"]),
    ("base-cycle", {"a.yaml": "base: sub/b.yaml\n", "sub/b.yaml": "base: ../a.yaml\n"}, "a.yaml", [], None,
     ["base cycle", f"a.yaml -> {os.path.join('sub', 'b.yaml')} -> a.yaml"]),
    ("self-base", {"a.yaml": "base: a.yaml\n"}, "a.yaml", [], None, ["base cycle: a.yaml -> a.yaml"]),
    ("missing-base", {"a.yaml": "base: nope.yaml\n"}, "a.yaml", [], None,
     ["nope.yaml: base file (named by `base:` in a.yaml) not found"]),
    ("base-not-string", {"a.yaml": "base: [x.yaml]\n"}, "a.yaml", [], None, ["base = ['x.yaml'] (from a.yaml)"]),
    ("missing-config", {}, "missing.yaml", [], None, ["missing.yaml: config file not found"]),
    ("non-mapping", {"c.yaml": "- 1\n- 2\n"}, "c.yaml", [], None, ["c.yaml: a config file must be a mapping",
                                                                   "got list"]),
    ("malformed", {"c.yaml": "optim: {lr: 0.1\nrun: x\n"}, "c.yaml", [], None, ["c.yaml:", "malformed YAML"]),
    ("duplicate-key", {"c.yaml": "optim: {lr: 0.1}\nrun: {epochs: 2}\noptim: {momentum: 0.5}\n"}, "c.yaml", [],
     None, ["c.yaml:3:1: malformed YAML", "duplicate key 'optim' (first at line 1)"]),
    ("override-no-equals", {"c.yaml": "{}\n"}, "c.yaml", ["optim.lr"], None,
     ["override 'optim.lr' (command line): expected KEY=VALUE"]),
    ("override-bad-yaml", {"c.yaml": "{}\n"}, "c.yaml", ["optim.lr=[1"], None,
     ["override 'optim.lr=[1'", "not valid YAML"]),
]


@pytest.mark.parametrize("files,path,overrides,world_size,expected", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_config_refused_with_key_and_file(here, files, path, overrides, world_size, expected):
    write(here, files)
    with pytest.raises(ConfigError) as err:
        cfg = load_config(path, overrides)
        validate(cfg, world_size=world_size)
    msg = str(err.value)
    for piece in expected:
        assert piece in msg, f"{piece!r} not in {msg!r}"
    assert isinstance(err.value, ValueError)


def test_bad_values_in_code_are_caught_by_validate():
    cfg = Config()
    cfg.optim.momentum = 1.0                 # a Config edited in code, never through a file
    with pytest.raises(ConfigError, match=r"optim.momentum = 1.0 \(default\): must be < 1"):
        validate(cfg)
    with pytest.raises(ConfigError, match="world_size"):
        validate(Config(), world_size=0)


# ----------------------------------------------------------------------------- property: any bad value names its key

SECTION_CLASSES = {"run": RunConfig, "data": DataConfig, "model": ModelConfig, "optim": OptimConfig,
                   "schedule": ScheduleConfig, "engine": EngineConfig, "log": LogConfig, "compare": CompareConfig}


def _checked_fields():
    out = []
    for sec, cls in SECTION_CLASSES.items():
        hints = typing.get_type_hints(cls)
        for fl in dataclasses.fields(cls):
            tp = hints[fl.name]
            base = [a for a in typing.get_args(tp) if a is not type(None)][0] if typing.get_origin(tp) is typing.Union \
                else tp
            if base in (int, float) or "choices" in fl.metadata:
                out.append((sec, fl.name, base, dict(fl.metadata)))
    return out


CHECKED = _checked_fields()


@st.composite
def bad_assignment(draw):
    sec, key, base, meta = draw(st.sampled_from(CHECKED))
    wrong_type = st.sampled_from(["seven", [1, 2], {"a": 1}, True] if base is not str else [7, 1.5, [1], False])
    options = [wrong_type]
    if base in (int, float):
        num = st.integers(-10**6, 10**6) if base is int else st.floats(-1e6, 1e6, allow_nan=False)
        if "gt" in meta:
            options.append(num.filter(lambda v, b=meta["gt"]: v <= b))
        if "ge" in meta:
            options.append(num.filter(lambda v, b=meta["ge"]: v < b))
        if "lt" in meta:
            options.append(num.filter(lambda v, b=meta["lt"]: v >= b))
        if "le" in meta:
            options.append(num.filter(lambda v, b=meta["le"]: v > b))
    if "choices" in meta:
        bad = st.text(min_size=1, max_size=8).filter(lambda s, c=meta["choices"]: s not in c)
        options.append(st.lists(bad, min_size=1, max_size=2) if sec == "compare" else bad)
    value = draw(st.one_of(options))
    return sec, key, value


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(bad_assignment())
def test_property_any_bad_value_names_key_path_and_source(assignment):
    sec, key, value = assignment
    with pytest.raises(ConfigError) as err:
        from_dict({sec: {key: value}}, source="prop.yaml")
    assert f"{sec}.{key} = " in str(err.value) and "(from prop.yaml)" in str(err.value), str(err.value)


# ----------------------------------------------------------------------------- the existence condition (float64)

@settings(max_examples=300, deadline=None)
@given(eta=st.floats(1e-4, 4.0), lam=st.floats(0.0, 0.2), gamma=st.floats(0.0, 0.999))
def test_exp_lr_exists_iff_quadratic_has_real_positive_root(eta, lam, gamma):
    # The exp-LR growth factor is a root of x² − (1+γ−λη)x + γ. Away from the double-root boundary
    # (relative gap 1e-9, far above float64 rounding of a few ulps), real roots <=> exp_lr_exists.
    bound = exp_lr_bound(gamma)
    if abs(eta * lam - bound) <= 1e-9 * max(bound, 1e-300):
        return
    roots = np.roots([1.0, -(1.0 + gamma - lam * eta), gamma])
    real = bool(np.all(np.abs(np.imag(roots)) <= 1e-12 * np.max(np.abs(roots))))
    has_positive_real_root = real and float(np.max(np.real(roots))) > 0
    assert exp_lr_exists(eta, lam, gamma) == has_positive_real_root
    assert math.isclose(bound, 1 + gamma - 2 * math.sqrt(gamma), rel_tol=1e-12, abs_tol=1e-15)


def test_exp_lr_boundary_is_inclusive():
    # γ = 0.25: (1 − 0.5)² = 0.25 exactly in binary; ηλ = 0.5 × 0.5 = 0.25 is the double root, allowed.
    assert exp_lr_exists(0.5, 0.5, 0.25)
    assert not exp_lr_exists(0.5, 0.5 * (1 + 1e-15), 0.25)
    assert not exp_lr_exists(1.0, 1.0, 0.0)      # γ = 0: the double root is x = 0, no finite equivalent


@settings(max_examples=200, deadline=None)
@given(eta=st.floats(1e-4, 4.0), lam=st.floats(0.0, 0.2), gamma=st.floats(0.0, 0.999))
def test_agrees_with_optimizer_math(eta, lam, gamma):
    # What validates here must be what the optimizer accepts (its module is written separately).
    expmath = pytest.importorskip("bigexp.optim.expmath")
    assert exp_lr_exists(eta, lam, gamma) == expmath.exp_form_exists(eta, lam, gamma)
    assert exp_lr_bound(gamma) == expmath.exp_form_bound(gamma)


# ----------------------------------------------------------------------------- round trip

def test_save_resolved_round_trip(here):
    cfg = load_config(os.path.join(REPO, "configs", "fmnist", "step_exp.yaml"), ["optim.lr=0.2", "run.max_steps=7"])
    out = here / "run" / "config.yaml"
    save_resolved(cfg, out)
    with open(out) as fh:
        raw = yaml.safe_load(fh)
    assert "base" not in raw and set(raw) == set(SECTION_CLASSES)
    assert load_config(str(out)) == cfg
    assert from_dict(to_dict(cfg)) == cfg
    assert os.listdir(out.parent) == ["config.yaml"]          # no temp file left behind
    cfg2 = load_config(str(out), ["optim.lr=0.05"])
    save_resolved(cfg2, out)                                   # replaces atomically
    assert load_config(str(out)).optim.lr == 0.05


# ----------------------------------------------------------------------------- the shipped configs

def _load_base_chain(path):
    chain = [path]
    while True:
        with open(chain[-1]) as fh:
            base = (yaml.safe_load(fh) or {}).get("base")
        if not base:
            return chain
        chain.append(os.path.normpath(os.path.join(os.path.dirname(chain[-1]), base)))


def test_configs_exist():
    names = {os.path.relpath(p, os.path.join(REPO, "configs")) for p in CONFIG_FILES}
    for must in ("fmnist/base.yaml", "fmnist/step.yaml", "fmnist/step_exp.yaml", "fmnist/const_wd.yaml",
                 "fmnist/const_exp.yaml", "fmnist/main.yaml", "fmnist/preact32_step.yaml",
                 "fmnist/preact32_const.yaml", "imagenet/rn50_base.yaml", "imagenet/rn50_step.yaml",
                 "imagenet/rn50_step_exp.yaml", "imagenet/rn50_const_wd.yaml", "imagenet/rn50_const_exp.yaml",
                 "imagenet/rn50_ffcv_fast.yaml", "imagenet/rn50_ffcv_fast_exp.yaml"):
        assert must.replace("/", os.sep) in names


@pytest.mark.parametrize("path", CONFIG_FILES, ids=[os.path.relpath(p, REPO) for p in CONFIG_FILES])
def test_every_shipped_config_loads_and_validates(path):
    cfg = load_config(path)
    for ws in (1, 2):
        validate(cfg, world_size=ws)
    if cfg.optim.optimizer == "expsgd" or "expsgd" in cfg.compare.arms:
        eta = cfg.optim.lr * (cfg.data.batch_size / cfg.optim.lr_reference_batch if cfg.optim.lr_reference_batch
                              else 1.0)
        assert exp_lr_exists(eta, cfg.optim.weight_decay, cfg.optim.momentum)
    chain = _load_base_chain(path)
    parent = chain[1] if len(chain) > 1 else None
    if parent and cfg.optim.optimizer == "expsgd":
        # An exp twin must differ from its base only in the arm and the run name, or the comparison lies.
        base_cfg = load_config(parent)
        if base_cfg.optim.optimizer == "sgd":
            a, b = to_dict(cfg), to_dict(base_cfg)
            diff = {(s, k) for s in a for k in a[s] if a[s][k] != b[s][k]}
            assert diff == {("optim", "optimizer"), ("run", "name")}, diff


def test_shipped_run_names_unique():
    names = {}
    for path in CONFIG_FILES:
        if os.path.basename(path).endswith("base.yaml"):
            continue
        name = load_config(path).run.name
        assert name not in names, f"{path} and {names[name]} share run.name {name!r}"
        names[name] = path


def test_shipped_config_facts():
    fm = load_config(os.path.join(REPO, "configs", "fmnist", "main.yaml"))
    assert fm.run.epochs == 4 and fm.compare.arms == ["sgd", "expsgd"] and fm.data.min_res == 28
    assert fm.optim.twin == "exact" and fm.data.fmnist_size == 28
    assert fm.model.channels_last is True and fm.compare.parallel is True  # the 2-core speed-ups (README)
    rn = load_config(os.path.join(REPO, "configs", "imagenet", "rn50_step.yaml"))
    assert (rn.model.arch, rn.model.num_classes, rn.run.epochs, rn.schedule.milestones) == ("resnet50", 1000, 90,
                                                                                            [30, 60, 80])
    assert (rn.engine.precision, rn.engine.zero_stage, rn.data.batch_size, rn.optim.lr_reference_batch) == \
        ("bf16_autocast", 1, 256, 256)
    ff = load_config(os.path.join(REPO, "configs", "imagenet", "rn50_ffcv_fast.yaml"))
    assert (ff.data.min_res, ff.data.max_res, ff.data.end_ramp_epoch, ff.data.val_res, ff.run.epochs) == \
        (160, 192, 13, 256, 16)


# ----------------------------------------------------------------------------- entry points

def _cli(*argv, cwd):
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-m", "bigexp", "config", *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60)


def test_cli_prints_resolved_yaml():
    res = _cli("--config", "configs/fmnist/step_exp.yaml", "optim.lr=0.2", cwd=REPO)
    assert res.returncode == 0, res.stderr
    expected = load_config(os.path.join(REPO, "configs", "fmnist", "step_exp.yaml"), ["optim.lr=0.2"])
    assert from_dict(yaml.safe_load(res.stdout)) == expected


def test_cli_overrides_anywhere_among_options():
    res = _cli("optim.lr=0.3", "--config", "configs/fmnist/main.yaml", "data.batch_size=64", "--set", "run.epochs=6",
               cwd=REPO)
    assert res.returncode == 0, res.stderr
    got = yaml.safe_load(res.stdout)
    assert (got["optim"]["lr"], got["data"]["batch_size"], got["run"]["epochs"]) == (0.3, 64, 6)
    assert "\nrun:\n  name: fmnist_main\n" in "\n" + res.stdout          # block style, one key per line


def test_cli_bad_config_exits_2_with_one_message(here):
    write(here, {"bad.yaml": "optim: {momentum: 1.5}\n"})
    res = _cli("--config", "bad.yaml", cwd=here)
    assert res.returncode == 2
    assert res.stdout == ""
    assert res.stderr.strip() == "bigexp: config error: optim.momentum = 1.5 (from bad.yaml): must be < 1"
    res = _cli("--config", "missing.yaml", "--world-size", "2", cwd=here)
    assert res.returncode == 2 and "missing.yaml: config file not found" in res.stderr
    assert "Traceback" not in res.stderr


def test_arm_config_checks_the_twin(here):
    write(here, {"c.yaml": "optim: {optimizer: sgd, lr: 0.5, weight_decay: 0.1}\n"})
    cfg = load_config("c.yaml")                      # fine as a plain SGD run
    assert arm_config(cfg, "sgd") == cfg
    with pytest.raises(ConfigError) as err:
        arm_config(cfg, "expsgd")
    assert "no exponential-LR equivalent" in str(err.value) and "optim.optimizer from compare.arms" in str(err.value)
    twin = arm_config(load_config(os.path.join(REPO, "configs", "fmnist", "const_wd.yaml")), "expsgd")
    assert twin == load_config(os.path.join(REPO, "configs", "fmnist", "const_exp.yaml"), ["run.name=fmnist_const_wd"])


def test_config_from_args_or_exit(here, capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    write(here, {"c.yaml": "data: {batch_size: 100}\n"})
    parser = add_config_arguments(argparse.ArgumentParser())
    assert config_from_args_or_exit(parser.parse_args(["--config", "c.yaml"]), world_size=4).data.batch_size == 100
    with pytest.raises(SystemExit) as ex:
        config_from_args_or_exit(parser.parse_args(["--config", "c.yaml"]), world_size=3)
    assert ex.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("bigexp: config error: data.batch_size = 100 (from c.yaml)") and "Traceback" not in err
