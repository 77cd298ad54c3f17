"""Every file bigexp reads, damaged: cut short, overwritten with random bytes, replaced by noise. Each must give a
clear error naming the file (exit 2 through the CLI), never a traceback or garbage, and leave what was already
written byte for byte as it was.

Ten seeded cases per file kind (`damaged`), through the functions that read them; then one real `python -m bigexp`
per kind: `bigexp config` (YAML), `bigexp data verify` (class map, integrity record, .beton), `bigexp report` (event
file), `bigexp compare --layout-only` (probe file), `bigexp train --resume` (checkpoint; slow: builds the model).
The .beton through `bigexp train`: tests/test_beton_integrity.py.
"""
from __future__ import annotations

import hashlib
import json
import random
import shutil
import sys
import types
import warnings
from pathlib import Path

import pytest

from conftest import REPO, fmnist_betons, run_group, train_args

BASE = REPO / "configs" / "fmnist" / "base.yaml"
CASES = 10


def tree_digest(root: Path) -> dict:
    """relative path -> sha256 of every file under root ("dir" for directories): equal before and after = nothing
    written, nothing lost."""
    root = Path(root)
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def damaged(data: bytes, seed: int, n: int = CASES, *, overwrite: bool = True) -> list[tuple[str, bytes]]:
    """n (label, bytes) versions of `data`, each different from it: empty, one byte short, noise of the same size,
    then alternately a cut at a random length and (when overwrite) 1..16 random bytes at a random offset."""
    rng = random.Random(seed)
    out = [("empty", b""), ("one byte short", data[:-1])]
    if overwrite:
        out.append(("noise, same size", rng.randbytes(len(data))))
    while len(out) < n:
        if not overwrite or len(out) % 2:
            k = rng.randrange(1, len(data))
            out.append((f"cut to {k} bytes", data[:k]))
            continue
        off, k = rng.randrange(len(data)), rng.randint(1, 16)
        b = bytearray(data)
        b[off:off + k] = rng.randbytes(len(b[off:off + k]))
        if bytes(b) != data:
            out.append((f"{k} random bytes at {off}", bytes(b)))
    return out


def cli(*args, timeout=240):
    """`python -m bigexp ARGS` in a child process: (returncode, stdout, stderr)."""
    return run_group([sys.executable, "-m", "bigexp", *map(str, args)], timeout=timeout, merge_stderr=False)


# ---------------------------------------------------------------------------------------------- config YAML
def test_damaged_config_files_raise_config_error_naming_the_file(tmp_path):
    from bigexp.config import ConfigError, load_config

    for i, (label, text) in enumerate(damaged(BASE.read_bytes(), seed=1)):
        path = tmp_path / f"c{i}.yaml"
        path.write_bytes(text)
        try:
            load_config(str(path))  # a cut between two complete keys is still a config: accepted
        except ConfigError as exc:
            assert path.name in str(exc), (label, str(exc))


def test_a_damaged_config_exits_2_through_the_cli_and_leaves_the_run_alone(tmp_path, monkeypatch, capsys):
    import bigexp.run.loop
    from bigexp.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"optim:\n  lr: [0.1\n" + random.Random(2).randbytes(64))
    r = cli("config", "--config", bad)
    assert r.returncode == 2 and str(bad.name) in r.stderr and "Traceback" not in r.stderr, r.stderr
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("# an earlier run\n")
    before = tree_digest(tmp_path / "runs")
    monkeypatch.setattr(bigexp.run.loop, "train", lambda *a, **k: pytest.fail("a damaged config was accepted"))
    with pytest.raises(SystemExit) as e:
        main(["train", "--config", str(bad), f"run.out_dir={tmp_path / 'runs'}", "run.name=r"])
    assert e.value.code == 2 and bad.name in capsys.readouterr().err
    assert tree_digest(tmp_path / "runs") == before


# ---------------------------------------------------------------------------------------------- checkpoints
def fake_checkpoint(root: Path, step: int) -> Path:
    """A checkpoint directory as CheckpointManager.save leaves it: shards plus a manifest of their sizes and
    sha256 (the shards are noise: only the manifest check reads them)."""
    from bigexp.filehash import file_sha256 as _sha256
    from bigexp.run.checkpoint import MANIFEST, CheckpointManager

    d = root / CheckpointManager.tag(step)
    d.mkdir(parents=True)
    rng = random.Random(step)
    for name in ("mp_rank_00_model_states.pt", "rng_rank0.pt"):
        (d / name).write_bytes(rng.randbytes(4096))
    files = {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(d.iterdir())}
    (d / MANIFEST).write_text(json.dumps({"global_step": step, "world_size": 1, "model": {}, "files": files}))
    return d


@pytest.mark.parametrize("target", ["manifest.json", "mp_rank_00_model_states.pt"])
def test_damaged_checkpoints_are_named_and_skipped_for_the_previous_one(target, tmp_path):
    from bigexp.run.checkpoint import CheckpointError, CheckpointManager, verify_checkpoint

    root = tmp_path / "run" / "checkpoints"
    older, newest = fake_checkpoint(root, 10), fake_checkpoint(root, 20)
    original = (newest / target).read_bytes()
    files = json.loads((newest / "manifest.json").read_text())["files"]
    ctx = types.SimpleNamespace(is_main=True, rank=0, world_size=1, broadcast_object=lambda o: o)
    manager = CheckpointManager(root, ctx)
    for label, data in damaged(original, seed=3):
        (newest / target).write_bytes(data)
        before = tree_digest(tmp_path / "run")
        try:
            manifest = verify_checkpoint(newest)
        except CheckpointError as exc:
            assert str(newest) in str(exc), (label, str(exc))
            with pytest.warns(UserWarning, match=f"skipping checkpoint {newest}"):
                assert manager.find_resumable("auto") == older, label
            with pytest.raises(CheckpointError, match=str(newest)):
                manager.find_resumable(str(newest))
        else:  # the damage hit what the size/sha check does not cover (global_step, model): the load checks those
            assert target == "manifest.json" and manifest["files"] == files, label
        assert tree_digest(tmp_path / "run") == before, label


@pytest.mark.slow
def test_a_damaged_checkpoint_named_by_resume_exits_2_and_leaves_the_run_alone(tmp_path):
    data = fmnist_betons(tmp_path / "data", train=64, val=16)
    ckpt = fake_checkpoint(tmp_path / "runs" / "r" / "checkpoints", 10)
    (ckpt / "manifest.json").write_bytes((ckpt / "manifest.json").read_bytes()[:40])
    before = tree_digest(tmp_path / "runs")
    args = train_args(str(BASE), tmp_path / "runs", data, "r", "run.threads=1", "data.batch_size=32",
                      "data.num_workers=1", "model.width=8")
    r = run_group([sys.executable, *args, "--resume", str(ckpt)], timeout=300, merge_stderr=False)
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert f"{ckpt / 'manifest.json'}: unreadable manifest" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert tree_digest(tmp_path / "runs") == before


# ---------------------------------------------------------------------------------------------- .beton, record, class map
@pytest.fixture(scope="module")
def beton(tmp_path_factory) -> Path:
    return fmnist_betons(tmp_path_factory.mktemp("fuzz"), train=64) / "train.beton"


def _place(src: Path, dst_dir: Path, name: str, **replace: bytes) -> Path:
    """src with its class map and record as dst_dir/name; `replace` (beton=, classes=, record=) swaps in bytes,
    record=None leaves the record out."""
    from bigexp.data import integrity
    from bigexp.data.beton import classes_path_for

    dst = dst_dir / name
    for kind, s, d in (("beton", src, dst), ("classes", classes_path_for(src), classes_path_for(dst)),
                       ("record", integrity.sidecar_path_for(src), integrity.sidecar_path_for(dst))):
        data = replace.get(kind, s.read_bytes())
        if data is not None:
            d.write_bytes(data)
    return dst


@pytest.mark.parametrize("kind", ["beton", "classes", "record", "beton_unrecorded"])
def test_damaged_data_files_raise_data_error_naming_the_file(kind, beton, tmp_path):
    from bigexp.data import integrity
    from bigexp.data.beton import DataError, check_beton, classes_path_for

    source = {"beton": beton, "beton_unrecorded": beton, "classes": classes_path_for(beton),
              "record": integrity.sidecar_path_for(beton)}[kind]
    # Without a record only the structure is checkable: cuts and a noisy header, not a changed pixel.
    cases = damaged(source.read_bytes(), seed=4, overwrite=kind != "beton_unrecorded")
    if kind == "beton_unrecorded":
        cases.append(("noise header", random.Random(5).randbytes(4096) + source.read_bytes()[4096:]))
    for i, (label, data) in enumerate(cases):
        replace = {"beton": data} if kind.startswith("beton") else {kind: data}
        if kind == "beton_unrecorded":
            replace["record"] = None
        dst = _place(beton, tmp_path, f"b{i}.beton", **replace)
        named = {"classes": classes_path_for(dst), "record": integrity.sidecar_path_for(dst)}.get(kind, dst)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the once-per-file "no recorded size/sha256" warning
            try:
                check_beton(dst)
            except DataError as exc:
                assert str(named) in str(exc), (label, str(exc))
            else:  # only a record whose damage left what is checked as it was (its final newline, "writer")
                assert kind == "record" and {k: v for k, v in json.loads(data).items() if k != "writer"} == \
                    {k: v for k, v in json.loads(source.read_bytes()).items() if k != "writer"}, label
        for p in tmp_path.iterdir():
            p.unlink()


def test_damaged_data_files_exit_2_through_bigexp_data_verify(beton, tmp_path):
    from bigexp.data import integrity
    from bigexp.data.beton import classes_path_for

    rng = random.Random(6)
    files = {"good": _place(beton, tmp_path, "good.beton"),
             "classes": _place(beton, tmp_path, "classes.beton", classes=rng.randbytes(40)),
             "record": _place(beton, tmp_path, "record.beton", record=b'{"format": "bigexp-beton-integ'),
             "beton": _place(beton, tmp_path, "flip.beton", beton=damaged(beton.read_bytes(), seed=7)[4][1])}
    before = tree_digest(tmp_path)
    r = cli("data", "verify", "--no-progress", *files.values())
    assert r.returncode == 2 and "3 of 4 file(s) bad" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert f"ok  {files['good']}" in r.stdout, r.stdout
    for kind, named in (("classes", classes_path_for(files["classes"])),
                        ("record", integrity.sidecar_path_for(files["record"])), ("beton", files["beton"])):
        assert f"BAD {named}" in r.stdout, (kind, r.stdout)
    assert tree_digest(tmp_path) == before


# ---------------------------------------------------------------------------------------------- probe files
def _probe_arms(logdir: Path) -> dict:
    """logdir/{sgd,expsgd}/probes/step_00000000.pt of a tiny model, as ProbeRecorder writes them."""
    import torch

    from bigexp.analysis.probes import PROBES_DIR, snapshot

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3))
    x = torch.randn(6, 4)
    out = {}
    for arm in ("sgd", "expsgd"):
        p = logdir / arm / PROBES_DIR / "step_00000000.pt"
        p.parent.mkdir(parents=True)
        torch.save(snapshot(model, x, 0, {"0.weight"}), p)
        out[arm] = p
    return out


def test_damaged_probe_files_raise_input_file_error_naming_the_file(tmp_path):
    from bigexp.analysis.probes import compute_gap
    from bigexp.errors import InputFileError

    probes = _probe_arms(tmp_path)
    original = probes["expsgd"].read_bytes()
    for label, data in damaged(original, seed=8):
        probes["expsgd"].write_bytes(data)
        before = tree_digest(tmp_path)
        try:
            rows = compute_gap(tmp_path / "sgd", tmp_path / "expsgd")
        except InputFileError as exc:
            assert str(probes["expsgd"]) in str(exc), (label, str(exc))
        else:  # a changed tensor value inside the zip: torch.load cannot tell; the gap is computed from it
            assert [r["step"] for r in rows] == [0], label
        assert tree_digest(tmp_path) == before, label


def test_a_damaged_probe_file_exits_2_through_bigexp_compare(tmp_path):
    probes = _probe_arms(tmp_path / "cmp")
    probes["expsgd"].write_bytes(probes["expsgd"].read_bytes()[:300])
    arms = {a: tree_digest(tmp_path / "cmp" / a) for a in probes}
    r = cli("compare", "--layout-only", "--no-report", "--config", BASE, f"run.out_dir={tmp_path}",
               "run.name=cmp")
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert f"{probes['expsgd']}: unreadable probe file" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert {a: tree_digest(tmp_path / "cmp" / a) for a in probes} == arms


# ---------------------------------------------------------------------------------------------- event files
def _event_run(run_dir: Path) -> Path:
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(str(run_dir))
    for step in range(20):
        w.add_scalar("train/loss", 1.0 / (step + 1), step)
    w.close()
    return next(run_dir.glob("events.out.tfevents.*"))


def test_damaged_event_files_raise_input_file_error_naming_the_file(tmp_path):
    from bigexp.analysis.events import load_scalar_events
    from bigexp.errors import InputFileError

    events = _event_run(tmp_path / "sgd")
    original = events.read_bytes()
    for label, data in damaged(original, seed=9):
        events.write_bytes(data)
        try:
            steps = list(load_scalar_events(tmp_path / "sgd").get("train/loss", ([],))[0])
        except InputFileError as exc:
            assert str(events) in str(exc), (label, str(exc))
        else:  # a cut: the records before it (what a run still writing looks like)
            assert label.startswith(("cut", "one byte", "empty")) and steps == list(range(len(steps))), label


def test_a_damaged_event_file_exits_2_through_bigexp_report_and_writes_nothing(tmp_path):
    events = _event_run(tmp_path / "logdir" / "sgd")
    _event_run(tmp_path / "logdir" / "expsgd")
    data = bytearray(events.read_bytes())
    data[len(data) // 2] ^= 0xFF
    events.write_bytes(bytes(data))
    before = tree_digest(tmp_path / "logdir")
    r = cli("report", tmp_path / "logdir")
    assert r.returncode == 2 and f"{events}: corrupt event file" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert tree_digest(tmp_path / "logdir") == before
