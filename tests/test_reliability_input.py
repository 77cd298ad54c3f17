"""Bad input to `bigexp train`: a clear error naming the key or file, exit status 2, and nothing written.

Configs are fuzzed with hypothesis through the real CLI entry point in-process (`bigexp.cli.main`), where a config
error exits before any process group, data or engine exists; `train()` is replaced by a tripwire, so a bad config
that slipped through fails the test instead of starting a run. Then real processes for the rest: the exit status
of `python -m bigexp train`, data paths that do not exist, a .beton of the wrong schema. (A checkpoint of another
model: tests/test_reliability_checkpoint.py.)
"""
from __future__ import annotations

import dataclasses
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bigexp.config.schema import Config
from bigexp.config.validate import section_types
from conftest import REPO, run_group

BASE = str(REPO / "configs" / "fmnist" / "base.yaml")

SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}


def _fields():
    out = []
    for name, f in ((f.name, f) for f in dataclasses.fields(Config)):
        cls = type(getattr(Config(), name))
        for key, (fld, tp) in section_types(cls).items():
            out.append((f"{name}.{key}", fld, tp))
    return out


FIELDS = _fields()
NON_STR = [(k, fld, tp) for k, fld, tp in FIELDS if "str" not in str(tp) and "list" not in str(tp)]
BOUNDED = [(k, fld, tp) for k, fld, tp in FIELDS if {"gt", "ge", "lt", "le"} & set(fld.metadata)]
IDENT = st.from_regex(r"[a-z][a-z0-9_]{0,12}", fullmatch=True)


@st.composite
def bad_override(draw):
    """(override text, the name the error must contain)."""
    kind = draw(st.sampled_from(["unknown_key", "unknown_section", "wrong_type", "out_of_range"]))
    if kind == "unknown_key":
        section = draw(st.sampled_from(sorted(SECTIONS)))
        key = draw(IDENT.filter(lambda k: f"{section}.{k}" not in {f for f, _, _ in FIELDS}))
        return f"{section}.{key}=1", f"{section}.{key}"
    if kind == "unknown_section":
        section = draw(IDENT.filter(lambda s: s not in SECTIONS and s != "base"))
        return f"{section}.x=1", section
    if kind == "wrong_type":
        key, _, _ = draw(st.sampled_from(NON_STR))
        # a word YAML reads as a string, never as a number, bool or null
        word = draw(st.from_regex(r"x[a-z]{0,8}", fullmatch=True))
        return f"{key}={word}", key
    key, fld, tp = draw(st.sampled_from(BOUNDED))
    m = fld.metadata
    is_int = "int" in str(tp) and "float" not in str(tp)
    over = draw(st.integers(1, 10**6)) if is_int else draw(st.floats(1e-6, 1e12))
    if "gt" in m or "ge" in m:
        low = m.get("gt", m.get("ge"))
        value = low - over if "ge" in m else low - (over - 1 if is_int else over)
    else:
        high = m.get("lt", m.get("le"))
        value = high + over if "le" in m else high + (over - 1 if is_int else over)
    value = int(value) if is_int else float(value)
    return f"{key}={value!r}", key


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bad=bad_override(), via_file=st.booleans())
def test_fuzzed_bad_configs_exit_2_naming_the_key_and_write_nothing(bad, via_file, tmp_path, monkeypatch, capsys):
    import bigexp.run.loop
    from bigexp.cli import main

    def tripwire(cfg, **kw):
        raise AssertionError(f"bad config accepted: {bad[0]}")

    monkeypatch.setattr(bigexp.run.loop, "train", tripwire)
    override, name = bad
    out = tmp_path / f"runs{abs(hash(bad)) % 10**9}"
    args = ["train", "--config", BASE, f"run.out_dir={out}"]
    if via_file:
        # the same mistake in a YAML file that chains the base config
        section, rest = override.split(".", 1)
        key, value = rest.split("=", 1)
        cfg_file = out.parent / f"bad{abs(hash(bad)) % 10**9}.yaml"
        cfg_file.write_text(f"base: {BASE}\n{section}:\n  {key}: {value}\n")
        args = ["train", "--config", str(cfg_file), f"run.out_dir={out}"]
    else:
        args.append(override)
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert name in err and "config error" in err, err
    assert not out.exists(), "a rejected config wrote into the run directory"


# --------------------------------------------------------------------------------------------- real processes
def bigexp_train(*args, timeout=180):
    return run_group([sys.executable, "-m", "bigexp", "train", "--config", BASE, "run.progress=false",
                      "run.threads=1", *args], timeout=timeout, merge_stderr=False)


@pytest.mark.slow
def test_process_exit_status_for_a_bad_key(tmp_path):
    r = bigexp_train(f"run.out_dir={tmp_path / 'runs'}", "optim.momentum=1.5")
    assert r.returncode == 2 and "optim.momentum" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "runs").exists()


@pytest.fixture(scope="module")
def wrong_schema_beton(tmp_path_factory):
    from ffcv.fields import FloatField, IntField
    from ffcv.writer import DatasetWriter

    path = tmp_path_factory.mktemp("schema") / "wrong.beton"

    class DS:
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return float(i), int(i)

    DatasetWriter(str(path), {"x": FloatField(), "label": IntField()}, num_workers=1).from_indexed_dataset(DS())
    return path


@pytest.mark.slow
@pytest.mark.parametrize("case", ["missing_train", "wrong_schema", "missing_source"])
def test_bad_data_paths_exit_2_naming_the_path_and_leave_the_run_alone(case, tmp_path, wrong_schema_beton):
    """A fresh run directory is not created; an existing one keeps every byte (config.yaml included)."""
    out = tmp_path / "runs"
    existing = out / "run" / "config.yaml"
    existing.parent.mkdir(parents=True)
    existing.write_text("# an earlier run's resolved config\n")
    good = tmp_path / "nowhere.beton"
    if case == "missing_train":
        args, name = [f"data.train_beton={good}", f"data.val_beton={good}", "data.write_missing=false"], str(good)
    elif case == "wrong_schema":
        args, name = [f"data.train_beton={wrong_schema_beton}", f"data.val_beton={wrong_schema_beton}"], \
            str(wrong_schema_beton)
    else:  # write_missing with a source directory that does not exist
        src = tmp_path / "no_such_dir"
        args = [f"data.train_beton={tmp_path / 't.beton'}", f"data.val_beton={tmp_path / 'v.beton'}",
                f"data.train_source={src}", f"data.val_source={src}", "data.dataset=imagenet"]
        name = str(src)
    r = bigexp_train(f"run.out_dir={out}", "run.name=run", *args)
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert name in r.stderr and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert sorted(p.name for p in out.rglob("*")) == ["config.yaml", "run"]
    assert existing.read_text() == "# an earlier run's resolved config\n"
    if case == "wrong_schema":
        assert "fields" in r.stderr
