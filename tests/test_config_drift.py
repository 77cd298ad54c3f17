"""Config drift on resume (bigexp/run/drift.py): a resume whose config differs from its checkpoint's in a key that
changes the trajectory is refused before any step (exit 2, every differing key as old -> new) unless accepted;
reporting/storage keys pass; every schema key is classified, so a new one cannot slip through."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import typing
from pathlib import Path

import pytest

from conftest import fmnist_betons, run_group, train_args

from bigexp.config import to_dict
from bigexp.config.schema import Config
from bigexp.data.integrity import FORMAT, sidecar_path_for
from bigexp.run.drift import (CONTENT, FREE, KEY_CLASSES, NOT_YET_IN_SCHEMA, TRAJECTORY, config_drift,
                              input_identity)

BASE = "configs/fmnist/base.yaml"


def schema_keys() -> set:
    hints = typing.get_type_hints(Config)
    return {f"{sec.name}.{fl.name}" for sec in dataclasses.fields(Config) for fl in dataclasses.fields(hints[sec.name])}


def test_every_schema_key_is_classified_and_nothing_else():
    keys = schema_keys()
    assert keys - KEY_CLASSES.keys() == set(), "classify these in bigexp/run/drift.py KEY_CLASSES"
    assert KEY_CLASSES.keys() - keys <= NOT_YET_IN_SCHEMA, "classified keys that are not in the schema"
    assert set(KEY_CLASSES.values()) <= {TRAJECTORY, CONTENT, FREE}


def test_trajectory_keys_are_listed_old_to_new_and_free_keys_pass():
    old = to_dict(Config())
    new = to_dict(Config())
    new["optim"]["lr"], new["schedule"]["milestones"], new["run"]["epochs"] = 0.2, [1], 3
    new["log"]["every_steps"], new["run"]["max_steps"], new["data"]["num_workers"] = 1, 7, 5
    new["run"]["checkpoint_every_steps"], new["run"]["out_dir"] = 2, "elsewhere"
    assert config_drift(old, new) == ["optim.lr: 0.1 -> 0.2", "run.epochs: 1 -> 3", "schedule.milestones: [] -> [1]"]
    new["optim"]["lr"], new["schedule"]["milestones"], new["run"]["epochs"] = 0.1, [], 1
    assert config_drift(old, new) == []


def test_a_key_only_one_side_has_is_not_compared():
    old = to_dict(Config())
    new = to_dict(Config())
    del old["optim"]["label_smoothing"]          # a checkpoint from a bigexp without the key
    new["optim"]["label_smoothing"] = 0.1
    new["optim"]["not_a_key_yet"] = True          # a key this checkpoint never had
    assert config_drift(old, new) == []


def _beton_with_record(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    record = {"format": FORMAT, "format_version": 1, "size": len(content),
              "sha256": hashlib.sha256(content).hexdigest(), "num_samples": 1, "fields": {}}
    sidecar_path_for(path).write_text(json.dumps(record))
    return path


def test_data_files_are_compared_by_recorded_content(tmp_path):
    a = _beton_with_record(tmp_path / "a.beton", b"one")
    moved = _beton_with_record(tmp_path / "moved.beton", b"one")
    old = to_dict(Config())
    old["data"]["train_beton"] = str(a)
    recorded = input_identity(old)
    assert recorded["data.train_beton"] == hashlib.sha256(b"one").hexdigest()
    new = to_dict(Config())
    new["data"]["train_beton"] = str(moved)
    assert config_drift(old, new, recorded) == []                      # same content elsewhere: passes
    _beton_with_record(a, b"two")                                       # rewritten in place
    new["data"]["train_beton"] = str(a)
    [line] = config_drift(old, new, recorded)
    assert line.startswith("data.train_beton: content changed") and str(a) in line
    assert config_drift(old, new, {}) == []                             # nothing recorded: same path passes
    new["data"]["train_beton"] = str(moved)
    assert config_drift(old, new, {}) == [f"data.train_beton: {str(a)!r} -> {str(moved)!r} "
                                          f"(no content record to compare: paths compared)"]


# ---------------------------------------------------------------------------------------------- real `bigexp train`
def tree_digest(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


@pytest.mark.slow
def test_resume_with_a_changed_trajectory_key_is_refused_unless_accepted(tmp_path):
    data = fmnist_betons(tmp_path / "data", train=128, val=32)
    out = tmp_path / "runs"

    def train(*extra, accept=False):
        args = train_args(BASE, out, data, "r", "run.threads=1", "data.batch_size=32", "data.num_workers=1",
                          "model.width=8", "log.plots=false", "run.checkpoint_every_steps=1", *extra)
        return run_group([sys.executable, *args, *(["--accept-config-change"] if accept else [])], timeout=400,
                         merge_stderr=False)

    r = train("run.max_steps=1")
    assert r.returncode == 0, r.stderr[-3000:]
    before = tree_digest(out)
    r = train("run.max_steps=2", "optim.lr=0.2", "schedule.gamma=0.5", "data.crop_scale_min=0.5", "run.seed=3",
              "log.every_steps=1")
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    for line in ("optim.lr: 0.1 -> 0.2", "schedule.gamma: 0.1 -> 0.5", "data.crop_scale_min: 0.08 -> 0.5",
                 "run.seed: 0 -> 3"):
        assert line in r.stderr, (line, r.stderr[-3000:])
    assert "log.every_steps" not in r.stderr and "run.max_steps" not in r.stderr and "Traceback" not in r.stderr
    assert "--accept-config-change" in r.stderr
    assert tree_digest(out) == before, "a refused resume wrote into the run directory"

    r = train("run.max_steps=2", "log.every_steps=1", "run.keep_checkpoints=5")   # free keys only: resumes
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout and (out / "r" / "checkpoints" / "step000000002").is_dir(), r.stdout[-2000:]

    r = train("run.max_steps=3", "optim.lr=0.2", "data.random_crop=true", accept=True)  # pinned even when accepted
    assert r.returncode == 2 and "optim.lr: 0.1 -> 0.2" in r.stderr and "even with --accept-config-change" in r.stderr
    assert "data.random_crop" not in r.stderr.split("even with")[1], r.stderr[-3000:]

    r = train("run.max_steps=3", "data.random_crop=true", accept=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "changed config (accepted)" in r.stderr and "data.random_crop: False -> True" in r.stderr, r.stderr[-3000:]
    assert (out / "r" / "checkpoints" / "step000000003").is_dir()
