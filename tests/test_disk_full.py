"""A full disk, for real: a small tmpfs (`mount -t tmpfs -o size=3M`, root only; skipped otherwise) filled while a
`bigexp train` runs on it.

- a checkpoint save that hits ENOSPC: exit 4 naming the directory and the free space, the previous checkpoint
  intact (it verifies), the partial save removed (bigexp/run/checkpoint.py);
- a TensorBoard write that hits ENOSPC: one warning, TensorBoard off, training goes on; once space is back the run
  finishes and checkpoints (bigexp/run/metrics.py).
"""
from __future__ import annotations

import errno
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from conftest import REPO, child_env, fmnist_betons, kill_tree, train_args

from bigexp.run.metrics import TBLogger

BASE = "configs/fmnist/base.yaml"
# TensorBoard's writer thread dies of the ENOSPC on purpose here; its traceback is expected, not a test failure.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")


@pytest.fixture
def tmpfs(tmp_path):
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3M", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(mnt: Path) -> Path:
    """Write zeros into mnt/filler until the device is full; returns the filler."""
    filler = mnt / "filler"
    chunk = b"\0" * 4096
    with open(filler, "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(chunk)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    return filler


def test_tensorboard_out_of_space_warns_once_and_turns_off(tmpfs):
    logger = TBLogger(tmpfs / "tb")
    logger.scalars(0, {"train/loss": 1.0})
    logger.flush()
    fill(tmpfs)
    t0 = time.monotonic()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(1, 2000):
            logger.scalars(step, {"train/loss": 1.0, "train/img_per_s": 2.0})
            logger.text("config", "x" * 1000, step)
        logger.flush()
        logger.close()
    assert time.monotonic() - t0 < 60, "stalled"
    msgs = [str(w.message) for w in caught if "TensorBoard logging" in str(w.message)]
    assert len(msgs) == 1 and "No space left on device" in msgs[0] and str(tmpfs / "tb") in msgs[0], msgs
    assert logger.writer is None and logger.failed.errno == errno.ENOSPC


def _train(out: Path, data: Path, log: Path, *extra: str) -> subprocess.Popen:
    args = train_args(BASE, out, data, "r", "run.threads=1", "data.batch_size=32", "data.num_workers=1",
                      "model.width=8", "log.plots=false", "log.every_steps=1", *extra)
    with open(log, "w") as fh:
        return subprocess.Popen([sys.executable, *args], cwd=REPO, env=child_env(BIGEXP_TEST_STEP_DELAY_S="2"),
                                stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)


def _wait(cond, proc: subprocess.Popen, log: Path, what: str, timeout: float = 400) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert proc.poll() is None, f"exited {proc.returncode} before {what}:\n" + log.read_text()[-4000:]
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.mark.slow
def test_a_checkpoint_save_out_of_space_exits_4_and_keeps_the_previous_one(tmpfs, tmp_path):
    from bigexp.run.checkpoint import verify_checkpoint

    data = fmnist_betons(tmp_path / "data", train=192, val=32)
    ckpts = tmpfs / "r" / "checkpoints"
    log = tmp_path / "train.log"
    proc = _train(tmpfs, data, log, "run.checkpoint_every_steps=1", "log.tensorboard=false")
    try:
        _wait(lambda: (ckpts / "step000000001").is_dir(), proc, log, "the step-1 checkpoint")
        fill(tmpfs)
        proc.wait(timeout=300)
    finally:
        kill_tree(proc.pid)
    text = log.read_text()
    assert proc.returncode == 4, text[-4000:]
    assert f"no space left on the device of {ckpts} while saving checkpoint step000000002" in text, text[-4000:]
    assert "MiB free after removing the partial save" in text and "Traceback" not in text, text[-4000:]
    assert f"previous checkpoint is intact: {ckpts / 'step000000001'}" in text
    assert sorted(p.name for p in ckpts.iterdir()) == ["step000000001"], "partial save left behind"
    assert verify_checkpoint(ckpts / "step000000001")["global_step"] == 1
    assert not (tmpfs / ".r.lock").exists()


@pytest.mark.slow
def test_tensorboard_out_of_space_in_a_run_warns_once_and_training_goes_on(tmpfs, tmp_path):
    """6 steps, checkpoint at the end of the epoch only. The disk fills after step 1: TensorBoard's next write fails
    (one warning, logging off); the space is then given back and the run must finish its 6 steps and checkpoint."""
    from bigexp.run.checkpoint import verify_checkpoint

    data = fmnist_betons(tmp_path / "data", train=192, val=32)
    log = tmp_path / "train.log"
    proc = _train(tmpfs, data, log)
    try:
        _wait(lambda: any(p.stat().st_size > 0 for p in (tmpfs / "r").glob("events.out.tfevents.*")), proc, log,
              "the first event")
        filler = fill(tmpfs)
        _wait(lambda: "TensorBoard logging to" in log.read_text(), proc, log, "the TensorBoard warning")
        filler.unlink()
        proc.wait(timeout=400)
    finally:
        kill_tree(proc.pid)
    text = log.read_text()
    assert proc.returncode == 0, text[-4000:]
    assert text.count("TensorBoard logging to") == 1 and "it is off for the rest of this run" in text, text[-4000:]
    assert verify_checkpoint(tmpfs / "r" / "checkpoints" / "step000000006")["global_step"] == 6
