"""Writing .betons (bigexp.data.beton, .imagefolder, .ensure): ImageFolder -> .beton, bad inputs, atomic writes,
ensure_betons."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from bigexp.config.schema import DataConfig
from bigexp.data import beton
from bigexp.data import imagefolder as W
from bigexp.data.beton import DataError, check_beton
from bigexp.data.ensure import ensure_betons
from bigexp.data.imagefolder import write_imagefolder

from conftest import IMAGENET_SAMPLE as SAMPLE, REPO
pytestmark = pytest.mark.skipif(not SAMPLE.is_dir(), reason=f"{SAMPLE} missing")


def small_tree(dst: Path, n_classes: int = 3) -> tuple[Path, list[Path]]:
    """An ImageFolder with the first n_classes real ImageNet classes (one JPEG each)."""
    wnids = sorted(p.name for p in SAMPLE.iterdir())[:n_classes]
    files = []
    for w in wnids:
        (dst / w).mkdir(parents=True)
        for f in sorted((SAMPLE / w).iterdir()):
            shutil.copy(f, dst / w / f.name)
            files.append(dst / w / f.name)
    return dst, files


def leftovers(d: Path) -> list[str]:
    """Temp files a write left behind: bigexp.atomic's `.<name>.<random>.tmp` (and the older `.tmp-` names)."""
    return sorted(p.name for p in d.iterdir() if p.name.endswith(".tmp") or ".tmp-" in p.name)


def test_small_tree_round_trip_metadata(tmp_path):
    src, files = small_tree(tmp_path / "src", 3)
    out = tmp_path / "out" / "small.beton"
    res = write_imagefolder(src, out, max_res=64, num_workers=1, progress=False)
    assert res.num_samples == 3 and res.num_skipped == 0 and Path(res.path) == out
    assert check_beton(out) == 3
    from ffcv.reader import Reader
    meta = Reader(str(out)).metadata
    assert list(meta["f1"]) == [0, 1, 2]
    # max_res bounds the longest stored side; these JPEGs are all larger than 64 px.
    assert int(np.maximum(meta["f0"]["width"], meta["f0"]["height"]).max()) == 64
    classes = json.loads(Path(res.classes_path).read_text())
    assert classes["classes"] == sorted(f.parent.name for f in files)
    assert classes["class_to_idx"] == {w: i for i, w in enumerate(classes["classes"])}
    assert leftovers(out.parent) == []


def test_missing_directory_named(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match=str(missing)):
        write_imagefolder(missing, tmp_path / "x.beton", progress=False)
    assert not (tmp_path / "x.beton").exists()


def test_source_without_class_folders_named(tmp_path):
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.JPEG").write_bytes(b"x")
    with pytest.raises(DataError, match=r"flat: no class folders"):
        write_imagefolder(tmp_path / "flat", tmp_path / "x.beton", progress=False)


def test_empty_class_folder_named(tmp_path):
    src, _ = small_tree(tmp_path / "src", 2)
    (src / "n99999999").mkdir()
    (src / "n99999999" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=r"n99999999: class folder has no images"):
        write_imagefolder(src, tmp_path / "x.beton", progress=False)
    assert not (tmp_path / "x.beton").exists()


def _corrupt(src: Path, files: list[Path]) -> list[Path]:
    truncated = files[0].parent / "truncated.JPEG"
    truncated.write_bytes(files[0].read_bytes()[:3000])  # a real JPEG cut short
    garbage = files[1].parent / "garbage.JPEG"
    garbage.write_bytes(b"\xff\xd8 this is not a jpeg" * 10)
    return [truncated, garbage]


def test_corrupt_jpegs_named(tmp_path):
    src, files = small_tree(tmp_path / "src", 3)
    bad = _corrupt(src, files)
    out = tmp_path / "x.beton"
    with pytest.raises(DataError) as ei:
        write_imagefolder(src, out, max_res=64, num_workers=1, progress=False)
    msg = str(ei.value)
    assert "2 unreadable image(s)" in msg
    for p in bad:
        assert str(p) in msg
    assert not out.exists() and leftovers(tmp_path) == []


def test_skip_corrupt_reports_and_writes_the_rest(tmp_path):
    src, files = small_tree(tmp_path / "src", 3)
    bad = _corrupt(src, files)
    out = tmp_path / "x.beton"
    res = write_imagefolder(src, out, max_res=64, num_workers=1, skip_corrupt=True, progress=False)
    assert res.num_skipped == 2 and sorted(res.skipped) == sorted(map(str, bad))
    assert res.num_samples == 3 and check_beton(out) == 3


def test_failure_midway_leaves_no_file_and_keeps_old_one(tmp_path, monkeypatch):
    """An image that becomes unreadable after validation kills a writer process mid-file: the
    error names the image, the old file under the final name is untouched, no temp file stays."""
    src, files = small_tree(tmp_path / "src", 3)
    victim = str(files[-1])  # the last sample: the earlier ones are already encoded
    parent = os.getpid()
    real = W.load_rgb

    def flaky(path):
        if path == victim and os.getpid() != parent:  # validation (parent) passes, writing fails
            raise OSError("disk went away")
        return real(path)

    monkeypatch.setattr(W, "load_rgb", flaky)
    out = tmp_path / "x.beton"
    out.write_bytes(b"previous complete file")
    with pytest.raises(DataError) as ei:
        write_imagefolder(src, out, max_res=64, num_workers=1, progress=False)
    assert victim in str(ei.value) and str(out) in str(ei.value)
    assert out.read_bytes() == b"previous complete file"
    assert leftovers(tmp_path) == []

    out.unlink()
    with pytest.raises(DataError):
        write_imagefolder(src, out, max_res=64, num_workers=1, progress=False)
    assert not out.exists() and leftovers(tmp_path) == []


def test_wrong_fields_and_non_beton_named(tmp_path):
    from ffcv.fields import FloatField, IntField

    class Rows:
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return (float(i), i)

    wrong = tmp_path / "wrong.beton"
    beton.write_indexed_dataset(Rows(), wrong, {"x": FloatField(), "label": IntField()}, num_workers=1,
                            progress=False)
    with pytest.raises(DataError, match=rf"{wrong}: .beton has fields .*'x': 'FloatField'"):
        check_beton(wrong)
    junk = tmp_path / "junk.beton"
    junk.write_bytes(b"\x00" * 10)
    with pytest.raises(DataError, match=rf"{junk}: not a readable FFCV .beton"):
        check_beton(junk)
    with pytest.raises(DataError, match=rf"{tmp_path / 'absent.beton'}: .beton file not found"):
        check_beton(tmp_path / "absent.beton")

    # ... and the loaders refuse it with the same message, before compiling anything.
    from bigexp.data.loaders import build_train_loader
    cfg = DataConfig(dataset="imagenet", train_beton=str(wrong), val_beton=str(wrong))
    with pytest.raises(DataError, match=str(wrong)):
        build_train_loader(cfg, batch_size=2, rank=0, world_size=1, seed=0)


def test_ensure_betons_single_rank(tmp_path):
    src, _ = small_tree(tmp_path / "src", 2)
    cfg = DataConfig(dataset="imagenet", train_source=str(src), val_source=str(src),
                     train_beton=str(tmp_path / "b" / "train.beton"),
                     val_beton=str(tmp_path / "b" / "val.beton"), write_max_res=32)
    out = ensure_betons(cfg, progress=False)
    assert [Path(r.path).name for r in out["written"]] == ["train.beton", "val.beton"]
    mtime = Path(out["train"]).stat().st_mtime_ns
    again = ensure_betons(cfg, progress=False)  # present: nothing rewritten
    assert again["written"] == [] and Path(out["train"]).stat().st_mtime_ns == mtime

    same = DataConfig(dataset="imagenet", train_source=str(src), val_source=str(tmp_path),
                      train_beton=str(tmp_path / "one.beton"), val_beton=str(tmp_path / "one.beton"))
    with pytest.raises(DataError, match=r"same file .*one.beton"):
        ensure_betons(same, progress=False)

    cfg.write_missing = False
    cfg.val_beton = str(tmp_path / "b" / "other.beton")
    with pytest.raises(DataError, match=r"data.val_beton=.*other.beton"):
        ensure_betons(cfg, progress=False)


def test_ensure_betons_failure_reaches_waiting_rank(tmp_path):
    """Rank 0 fails (source missing): it raises naming the source, and a waiting rank raises too
    instead of polling forever."""
    cfg = DataConfig(dataset="imagenet", train_source=str(tmp_path / "gone"), val_source=str(tmp_path / "gone"),
                     train_beton=str(tmp_path / "train.beton"), val_beton=str(tmp_path / "val.beton"))
    with pytest.raises(DataError, match=str(tmp_path / "gone")):
        ensure_betons(cfg, rank=0, world_size=2, progress=False)
    with pytest.raises(DataError, match=r"train.beton: rank 0 failed to write it: .*gone"):
        ensure_betons(cfg, rank=1, world_size=2, progress=False, timeout_s=30)


@pytest.mark.slow  # a fresh interpreter importing torch + ffcv: 5-15 s
def test_first_ffcv_import_keeps_torch_threads(tmp_path):
    """ffcv's compiler module calls torch.set_num_threads(1) when first imported; bigexp.data's
    entry points must leave the caller's count alone (fresh interpreter: ffcv not yet imported)."""
    import subprocess
    import sys
    code = ("import sys, torch; torch.set_num_threads(3)\n"
            "from bigexp.data.beton import DataError, check_beton\n"
            "try:\n    check_beton('/nonexistent.beton')\nexcept DataError:\n    pass\n"
            "assert 'ffcv' in sys.modules\n"
            "print(torch.get_num_threads())\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "3"
