"""compare.parallel: the arms as concurrent `bigexp compare --arm` processes, then the layout, gap and report.

What could go wrong and is checked here on real runs (DeepSpeed engines, FFCV loaders, 512 Fashion-MNIST images):
a child trains something else than the sequential compare would (so each arm's val metrics must equal a
sequential run's bit for bit, same thread count), the parent finishes before its children or without their gap, a
Ctrl-C that loses the children's work (it must checkpoint both, and the rerun must resume both to the same end),
a failing child reported as success, and a bad arm config found only after another arm started. The children run
on tcmalloc (compare.allocator: auto, launch/setup.sh installs it) and the sequential compare on glibc in this
process, so the bitwise equality also says the allocator changes no result.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO
from test_compare import small_data, small_overrides

pytestmark = pytest.mark.slow


def _cli(*args, env=None, **kw):
    return subprocess.run([sys.executable, "-m", "bigexp", "compare", "--config", "configs/fmnist/base.yaml", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})}, **kw)


def _val(run_dir: Path) -> dict:
    from bigexp.analysis.events import load_scalars

    return {tag: series for tag, series in load_scalars(run_dir).items() if tag.startswith("val/")}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return small_data(tmp_path_factory.getbasetemp() / "shared_compare")


def test_plan_splits_the_cores():
    from bigexp.analysis.parallel import plan
    from bigexp.config import load_config

    cfg = load_config(str(REPO / "configs/fmnist/main.yaml"))
    assert plan(cfg, cores=2) == (2, 1) and plan(cfg, cores=16) == (2, 8)
    cfg.compare.seeds = [0, 1, 2]
    assert plan(cfg, cores=2) == (2, 1) and plan(cfg, cores=4) == (4, 1)
    cfg.compare.control, cfg.run.threads = True, 3
    assert plan(cfg, cores=64) == (9, 3)  # 3 arms x 3 seeds; run.threads as set
    # the cores this process may use (a SLURM allocation, taskset), not the node's: for the children and for a rank
    one = subprocess.run(["taskset", "-c", "0", sys.executable, "-c",
                          "from bigexp.run.distributed import rank_threads; print(rank_threads(None, 1))"],
                         cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert one.stdout.strip() == "1", one.stderr


def test_children_preload_tcmalloc_and_a_missing_one_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    from bigexp.analysis import parallel
    from bigexp.config import load_config
    from bigexp.errors import ConfigError
    from bigexp.run import allocator

    lib = allocator.tcmalloc_path()
    assert lib, f"tcmalloc not installed: {allocator.INSTALL_HINT}"
    env = allocator.with_preload({**os.environ, "LD_PRELOAD": "/x/other.so"}, lib)
    assert env["LD_PRELOAD"].split() == [lib, "/x/other.so"]
    env["LD_PRELOAD"] = lib  # what a child started with it has mapped (the loader took it, not just the variable)
    maps = subprocess.run([sys.executable, "-c", "print(open('/proc/self/maps').read())"], env=env,
                          capture_output=True, text=True, check=True).stdout
    assert Path(lib).name in maps
    assert allocator.resolve("system") is None and allocator.resolve("auto") == lib

    monkeypatch.setattr(allocator, "tcmalloc_path", lambda: None)
    assert allocator.resolve("auto") is None
    cfg = load_config(str(REPO / "configs/fmnist/main.yaml"), [f"run.out_dir={tmp_path}", "compare.allocator=tcmalloc"])
    with pytest.raises(ConfigError, match="compare.allocator: tcmalloc is not installed") as e:
        parallel.compare_parallel(cfg, cores=2)
    assert e.value.exit_code == 2 and not any(tmp_path.iterdir())


def test_parallel_equals_sequential_and_finishes(data, tmp_path):
    from bigexp.analysis.runner import compare
    from bigexp.config import load_config

    over = small_overrides(data, tmp_path / "par", "p")
    r = _cli(*over, "compare.parallel=true")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 runs, 2 at a time, 1 torch thread(s) each, malloc libtcmalloc" in r.stdout, r.stdout
    assert "[sgd] ended: done" in r.stdout and "[expsgd] ended: done" in r.stdout
    logdir = tmp_path / "par" / "p"
    assert (logdir / "report.md").is_file() and (logdir / "compare.yaml").is_file()
    assert [p.name for p in (logdir / "gap").iterdir() if "tfevents" in p.name], "no gap run"
    seq = compare(load_config(str(REPO / "configs/fmnist/base.yaml"), small_overrides(data, tmp_path / "seq", "s")))
    for arm in ("sgd", "expsgd"):
        par_val, seq_val = _val(logdir / arm), _val(seq.logdir / arm)
        assert par_val and par_val == seq_val, arm  # same code path, threads and data order: the same bits


def test_ctrl_c_checkpoints_both_arms_and_the_rerun_resumes_them(data, tmp_path):
    over = small_overrides(data, tmp_path, "sig") + ["run.max_steps=8", "run.checkpoint_every_steps=1",
                                                      "compare.parallel=true", "log.plots=false"]
    cmd = [sys.executable, "-m", "bigexp", "compare", "--config", "configs/fmnist/base.yaml", *over]
    env = {**os.environ, "PYTHONPATH": str(REPO), "BIGEXP_TEST_STEP_DELAY_S": "1.0"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ckpts = [tmp_path / "sig" / arm / "checkpoints" for arm in ("sgd", "expsgd")]
    deadline = time.time() + 300
    while not all(d.is_dir() and any(d.iterdir()) for d in ckpts):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0]
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)  # what a Ctrl-C does: only the parent gets it (children have their own group)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert "stopped by a signal" in out and out.count("preempted: checkpoint at step") == 2, out
    assert not (tmp_path / "sig" / "report.md").exists()
    r = _cli(*over)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "[sgd] [bigexp] resumed from" in r.stdout and "[expsgd] [bigexp] resumed from" in r.stdout
    from bigexp.analysis.events import load_scalars
    for arm in ("sgd", "expsgd"):
        assert max(load_scalars(tmp_path / "sig" / arm)["train/loss"][0]) == 8, arm
    assert (tmp_path / "sig" / "report.md").is_file()


def test_failing_children_give_their_status(data, tmp_path):
    r = _cli(*small_overrides(data, tmp_path, "nan"), "compare.parallel=true", "log.plots=false",
             env={"BIGEXP_TEST_NAN_AT_STEP": "2"})
    assert r.returncode == 3, r.stdout + r.stderr  # a non-finite loss (bigexp.errors)
    assert "sgd (status 3)" in r.stderr and "expsgd (status 3)" in r.stderr
    assert not (tmp_path / "nan" / "report.md").exists()


def test_an_arm_config_that_cannot_exist_is_refused_before_any_child(data, tmp_path):
    # lr x wd above (1 - sqrt(momentum))^2: the sgd arm is fine, its exp-LR twin does not exist
    r = _cli(*small_overrides(data, tmp_path, "bad"), "compare.parallel=true", "optim.lr=2.0",
             "optim.weight_decay=0.05")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "optim" in r.stderr and not (tmp_path / "bad" / "sgd").exists()
