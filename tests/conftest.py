"""What several test files need, in one place. Tests import it by name (`from conftest import REPO, run_group`):
under pytest's default import mode tests/ is on sys.path and this module is already loaded as `conftest`.

Paths and child processes come from bench/_launch.py, which bench/ runs its own launches with; the Fashion-MNIST
.beton files and the `bigexp train` command line are the tests' own. Nothing here imports bigexp or torch at load
time, so tests/test_structure.py still runs while the package cannot be imported.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from _launch import (FMNIST_DIR, IMAGENET_SAMPLE, REPO, SHARED, GroupTimeout, child_env, children,  # noqa: E402
                     kill_tree, run_group, torchrun_cmd)

__all__ = ["FMNIST_DIR", "IMAGENET_SAMPLE", "REPO", "SHARED", "GroupTimeout", "child_env", "children", "kill_tree",
           "run_group", "torchrun_cmd", "fmnist_betons", "train_args"]


def fmnist_betons(directory: Path, *, train: int, val: int = 0) -> Path:
    """`directory` with train.beton (the first `train` training images) and, unless val is 0, val.beton (the first
    `val` test images), 32 px. Skips the test when Debian's dataset-fashion-mnist is not installed."""
    # imported here: only the tests that write data pay for torch and ffcv, and conftest loads for every test
    from bigexp.data.fmnist import write_fashion_mnist

    if not FMNIST_DIR.is_dir():
        pytest.skip(f"{FMNIST_DIR} missing (apt-get install dataset-fashion-mnist)")
    write_fashion_mnist(FMNIST_DIR, directory / "train.beton", size=32, split="train", limit=train, progress=False)
    if val:
        write_fashion_mnist(FMNIST_DIR, directory / "val.beton", size=32, split="test", limit=val, progress=False)
    return directory


def train_args(config: str, out: Path, data: Path, name: str, *overrides: str) -> list[str]:
    """The arguments after `python` or torchrun for `bigexp train`: `config`, the run in out/name, the data of
    fmnist_betons(data) and never written, no progress bar; then `overrides` (later ones win)."""
    return ["-m", "bigexp", "train", "--config", config, f"run.out_dir={out}", f"run.name={name}", "run.progress=false",
            f"data.train_beton={data / 'train.beton'}", f"data.val_beton={data / 'val.beton'}",
            "data.write_missing=false", *overrides]


@pytest.fixture
def one_thread():
    """One intra-op torch thread for the test: tiny convs on the shared 2-core machine run 5-20x slower with two
    contended threads. The caller's count is restored after."""
    import torch  # here, not at load time (see the module docstring)

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# Files that take minutes (SLURM requeue waits, two-node restarts, multi-rank DeepSpeed runs), run first: with two
# xdist workers taking whole files (launch/test.sh), a long file picked up last would leave one core idle at the end.
LONG_FILES = ("test_slurm.py", "test_multinode.py", "test_reliability_dist.py", "test_world_size_resume.py",
              "test_twin_exact.py", "test_compile.py", "test_zero2.py", "test_seeds_control.py", "test_examples.py",
              "test_compare_parallel.py")


def pytest_configure(config):
    """pytest-xdist (3.x) hands out --dist loadfile files by number of tests, most first (--loadscope-reorder, on by
    default), which would put LONG_FILES - few tests each - last: the order below is the one that should hold."""
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    order = {id(item): n for n, item in enumerate(items)}
    items.sort(key=lambda item: (rank.get(item.path.name, len(LONG_FILES)), order[id(item)]))
