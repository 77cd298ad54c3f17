"""`bigexp data ...` through the real CLI dispatcher (in-process: same code path, no interpreter start-up)."""
from __future__ import annotations

from pathlib import Path

import pytest

from bigexp.cli import main

from conftest import FMNIST_DIR as IDX, IMAGENET_SAMPLE as SAMPLE


def small_tree(dst: Path, n_classes: int) -> tuple[Path, list[Path]]:
    """An ImageFolder of the first n_classes real ImageNet classes (symlinked JPEGs)."""
    files = []
    for w in sorted(p.name for p in SAMPLE.iterdir())[:n_classes]:
        (dst / w).mkdir(parents=True)
        for f in sorted((SAMPLE / w).iterdir()):
            (dst / w / f.name).symlink_to(f)
            files.append(dst / w / f.name)
    return dst, files


@pytest.mark.skipif(not SAMPLE.is_dir(), reason=f"{SAMPLE} missing")
def test_imagefolder_command(tmp_path, capsys):
    src, _ = small_tree(tmp_path / "src", 2)
    out = tmp_path / "o" / "x.beton"
    assert main(["data", "imagefolder", str(src), str(out), "--max-res", "32", "--write-mode", "raw",
                 "--num-workers", "1", "--no-progress"]) == 0
    assert out.is_file() and Path(str(out) + ".classes.json").is_file()
    assert f"wrote {out}: 2 samples" in capsys.readouterr().out

    missing = tmp_path / "missing"
    assert main(["data", "imagefolder", str(missing), str(out), "--no-progress"]) == 2  # bad input (bigexp.errors)
    assert str(missing) in capsys.readouterr().err


@pytest.mark.skipif(not IDX.is_dir(), reason=f"{IDX} missing")
def test_fmnist_command(tmp_path, capsys):
    assert main(["data", "fmnist", str(IDX), str(tmp_path), "--size", "28", "--limit", "100", "--no-progress"]) == 0
    assert (tmp_path / "fmnist_train.beton").is_file() and (tmp_path / "fmnist_test.beton").is_file()
    assert capsys.readouterr().out.count(": 100 samples") == 2


@pytest.mark.skipif(not SAMPLE.is_dir(), reason=f"{SAMPLE} missing")
def test_write_command_from_config(tmp_path, capsys):
    pytest.importorskip("bigexp.config.load")
    src, _ = small_tree(tmp_path / "src", 2)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data:\n  dataset: imagenet\n  train_source: {src}\n  val_source: {src}\n"
                   f"  train_beton: {tmp_path / 'b' / 'train.beton'}\n  val_beton: {tmp_path / 'b' / 'val.beton'}\n")
    assert main(["data", "write", "--config", str(cfg), "data.write_max_res=32", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "train.beton: 2 samples" in out and "val.beton: 2 samples" in out
    assert main(["data", "write", "--config", str(cfg), "--no-progress"]) == 0
    assert "nothing to write" in capsys.readouterr().out
    assert main(["data", "write", "--config", str(cfg), "data.write_max_res=-3", "--no-progress"]) == 2
    assert "data.write_max_res" in capsys.readouterr().err
