""".beton integrity (bigexp.data.integrity): the writer's size/sha256 record, the cheap check at every load, the full
hash of `bigexp data verify`, and files written before records existed."""
from __future__ import annotations

import hashlib
import json
import shutil
import sys
import warnings
from pathlib import Path

import pytest

from bigexp.cli import main
from bigexp.config.schema import DataConfig
from bigexp.data import integrity
from bigexp.data.beton import DataError, check_beton, classes_path_for
from bigexp.data.ensure import ensure_betons

from conftest import REPO, fmnist_betons, run_group, train_args
from test_fuzz_inputs import tree_digest


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """train.beton (64 images: two 8 MiB FFCV pages) and val.beton (16), with their records and class maps."""
    return fmnist_betons(tmp_path_factory.mktemp("betons"), train=64, val=16)


def copy_beton(src: Path, dst: Path, *, record: bool = True) -> Path:
    """src with its class map and (unless record is False) its integrity record, as dst."""
    shutil.copy(src, dst)
    shutil.copy(classes_path_for(src), classes_path_for(dst))
    if record:
        shutil.copy(integrity.sidecar_path_for(src), integrity.sidecar_path_for(dst))
    return dst


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        b = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([b[0] ^ 0x01]))


def middle_of_a_record(path: Path) -> int:
    """A byte in the middle of sample 10's pixels (not header, metadata or allocation table)."""
    from ffcv.reader import Reader

    table = Reader(str(path)).alloc_table
    row = table[table["sample_id"] == 10][0]
    return int(row["ptr"] + row["size"] // 2)


def test_the_writer_records_size_hash_fields_and_class_map(data):
    beton = data / "train.beton"
    info = json.loads(integrity.sidecar_path_for(beton).read_text())
    assert info["size"] == beton.stat().st_size
    assert info["sha256"] == hashlib.sha256(beton.read_bytes()).hexdigest()
    assert info["classes_sha256"] == hashlib.sha256(classes_path_for(beton).read_bytes()).hexdigest()
    assert (info["num_samples"], info["fields"]) == (64, {"image": "RGBImageField", "label": "IntField"})
    assert info["format"] == integrity.FORMAT and info["writer"].startswith("bigexp ")
    assert sorted(p.name for p in data.iterdir() if p.name.startswith(".")) == []  # no temp files left


def test_verify_names_a_bit_flipped_file_and_exits_2(data, tmp_path, capsys):
    good = copy_beton(data / "train.beton", tmp_path / "good.beton")
    bad = copy_beton(data / "train.beton", tmp_path / "bad.beton")
    flip_byte(bad, middle_of_a_record(bad))
    assert main(["data", "verify", str(good), str(bad), "--no-progress"]) == 2
    out = capsys.readouterr()
    assert f"ok  {good}: 64 samples" in out.out and "sha256 as recorded" in out.out
    assert f"BAD {bad}: sha256" in out.out and "1 of 2 file(s) bad" in out.err
    assert main(["data", "verify", str(good), "--no-progress"]) == 0


def test_every_load_catches_truncation_before_any_batch(data, tmp_path):
    """The cheap check: size against the record; without a record, the header and allocation table."""
    from bigexp.data.loaders import build_val_loader

    whole = (data / "val.beton").read_bytes()
    for record in (True, False):
        cut = copy_beton(data / "val.beton", tmp_path / f"cut{record}.beton", record=record)
        cut.write_bytes(whole[: len(whole) - 1000])
        with pytest.raises(DataError, match=str(cut)) as e:
            build_val_loader(DataConfig(val_beton=str(cut), num_workers=1), batch_size=8)
        assert ("truncated" in str(e.value)) if record else ("allocation table" in str(e.value)), e.value
        with pytest.raises(DataError, match=str(cut)):
            ensure_betons(DataConfig(train_beton=str(cut), val_beton=str(cut), write_missing=False), progress=False)


def test_a_flipped_pixel_is_caught_at_load_in_a_small_file_and_by_verify_in_a_big_one(data, tmp_path, monkeypatch):
    bad = copy_beton(data / "train.beton", tmp_path / "flipped.beton")
    flip_byte(bad, middle_of_a_record(bad))
    with pytest.raises(DataError, match=f"{bad}: sha256"):
        check_beton(bad)
    # A file over the full-hash limit (ImageNet): a changed pixel passes the cheap check; only verify sees it.
    monkeypatch.setattr(integrity, "FULL_HASH_ON_LOAD_MAX_BYTES", 0)
    assert check_beton(bad) == 64
    with pytest.raises(DataError, match="sha256"):
        check_beton(bad, full_hash=True)


def test_a_file_without_a_record_loads_with_one_warning_and_can_be_recorded(data, tmp_path, capsys):
    old = copy_beton(data / "train.beton", tmp_path / "old.beton", record=False)
    with pytest.warns(UserWarning, match="no recorded size/sha256"):
        assert check_beton(old) == 64
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_beton(old) == 64  # once per file
    assert main(["data", "verify", str(old), "--no-progress"]) == 0
    assert "no recorded hash" in capsys.readouterr().out
    assert main(["data", "verify", "--record", str(old), "--no-progress"]) == 0
    assert "recorded now" in capsys.readouterr().out
    assert json.loads(integrity.sidecar_path_for(old).read_text())["sha256"] == \
        json.loads(integrity.sidecar_path_for(data / "train.beton").read_text())["sha256"]
    assert main(["data", "verify", str(old), "--no-progress"]) == 0
    assert "sha256 as recorded" in capsys.readouterr().out


def test_labels_outside_the_class_map_and_a_changed_class_map_are_refused(data, tmp_path):
    beton = copy_beton(data / "train.beton", tmp_path / "x.beton")
    classes = classes_path_for(beton)
    obj = json.loads(classes.read_text())
    classes.write_text(json.dumps({**obj, "classes": obj["classes"][:3]}))
    with pytest.raises(DataError, match=f"{classes}: differs"):
        check_beton(beton)
    integrity.sidecar_path_for(beton).unlink()  # no record: the label range still holds it
    with pytest.raises(DataError, match="has 3 classes"):
        check_beton(beton)


@pytest.mark.slow
def test_train_on_a_truncated_beton_exits_2_naming_it_and_leaves_the_run_alone(data, tmp_path):
    betons = tmp_path / "data"
    betons.mkdir()
    copy_beton(data / "val.beton", betons / "val.beton")
    train = copy_beton(data / "train.beton", betons / "train.beton")
    train.write_bytes(train.read_bytes()[:-4096])
    run = tmp_path / "runs" / "r"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("# an earlier run's resolved config\n")
    before = tree_digest(tmp_path / "runs")
    args = train_args(str(REPO / "configs" / "fmnist" / "base.yaml"), tmp_path / "runs", betons, "r", "run.threads=1")
    r = run_group([sys.executable, *args], timeout=300, merge_stderr=False)
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert f"{train}: size" in r.stderr and "truncated" in r.stderr and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert tree_digest(tmp_path / "runs") == before
