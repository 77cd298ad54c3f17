"""Smoke tests for bench/: every benchmark runs at tiny sizes and prints ONE valid JSON object with the keys
the README table is built from. They keep the scripts from rotting; the figures themselves are not checked
(timings on a shared CI machine mean nothing at these sizes)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import IMAGENET_SAMPLE, REPO, run_group

pytestmark = pytest.mark.slow

BENCH = REPO / "bench"
COMMON_KEYS = {"bench", "args", "machine", "versions", "notes"}
MACHINE_KEYS = {"cpu", "cores", "gpu"}
VERSION_KEYS = {"python", "torch", "deepspeed", "ffcv"}


def parse_one_json(stdout: str) -> dict:
    lines = [ln for ln in stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, f"stdout must hold exactly one JSON line, got {len(lines)}:\n{stdout[-3000:]}"
    obj = json.loads(lines[0])
    assert COMMON_KEYS <= set(obj), sorted(obj)
    assert MACHINE_KEYS <= set(obj["machine"])
    assert VERSION_KEYS <= set(obj["versions"])
    return obj


def run_json(script: str, *args: str, timeout: int = 240) -> dict:
    # stdout alone: the scripts send every log line (theirs, DeepSpeed's, workers') to stderr. A timeout also
    # ends torchrun's ranks and DataLoader workers.
    proc = run_group([sys.executable, str(BENCH / script), *args], timeout=timeout, merge_stderr=False)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return parse_one_json(proc.stdout)


def test_optimizer_bench():
    r = run_json("optimizer.py", "--arch", "fmnist_resnet", "--rounds", "1", "--steps", "3", "--warmup-steps", "1")
    cpu = r["results"]["cpu"]
    assert {"expsgd_s_per_step", "sgd_s_per_step", "ratio", "groups"} <= set(cpu)
    assert [g["scale_invariant"] for g in cpu["groups"]] == [True, False]
    assert cpu["ratio"] > 0


def test_train_bench():
    r = run_json("train.py", "--cases", "fmnist_resnet:32:8:1", "--precisions", "fp32,bf16", "--rounds", "1")
    assert set(r["results"]) == {"fmnist_resnet@32px/b8/fp32", "fmnist_resnet@32px/b8/bf16"}
    for v in r["results"].values():
        assert v["bigexp_images_per_s"]["median"] > 0 and v["plain_images_per_s"]["median"] > 0
        assert v["ratio"] > 0


def test_compile_bench():
    # dynamo's eager backend: the bench's plumbing without inductor's minutes of C++ compilation
    r = run_json("compile.py", "--cases", "fmnist_resnet:32:8:1", "--arms", "expsgd", "--rounds", "1",
                 "--backend", "eager")
    assert r["backend"] == "eager" and set(r["results"]) == {"fmnist_resnet@32px/b8/fp32/expsgd"}
    v = r["results"]["fmnist_resnet@32px/b8/fp32/expsgd"]
    assert v["eager_s_per_step"]["median"] > 0 and v["compiled_s_per_step"]["median"] > 0
    assert v["ratio_compiled_over_eager"] > 0 and "compile_s" in v and r["load_avg_start"]


@pytest.fixture(scope="module")
def bench_data_dir(tmp_path_factory):
    if not IMAGENET_SAMPLE.is_dir():
        pytest.skip(f"{IMAGENET_SAMPLE} missing")
    return tmp_path_factory.mktemp("bench_data")


def test_data_bench(bench_data_dir):
    r = run_json("data.py", "--images", "24", "--batch-size", "8", "--workers", "1", "--rounds", "1",
                 "--out", str(bench_data_dir))
    assert set(r["images_per_s"]) == {"pil", "ffcv_full", "ffcv_256"}
    assert set(r["ratio"]) == {"ffcv_full/pil", "ffcv_256/pil"}
    assert all(v["median"] > 0 for v in r["images_per_s"].values())
    assert r["images_per_epoch"] == {"pil": 24, "ffcv_full": 24, "ffcv_256": 24}


def test_gpu_bench_cpu_smoke(bench_data_dir):
    r = run_json("gpu.py", "--cpu-smoke", "--images", "16", "--out", str(bench_data_dir))
    assert r["errors"] == {}
    assert r["step"]["ratio"] > 0 and r["loader"]["images_per_s"]["median"] > 0


@pytest.mark.parametrize("script", ["gpu.sh", "gpu_validate.sh"])
def test_gpu_sh_parses(script):
    proc = subprocess.run(["bash", "-n", str(BENCH / script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_scaling_bench():
    r = run_json("scaling.py", "--rounds", "1", "--batch", "8", "--steps", "2", "--warmup", "1", timeout=300)
    assert set(r["images_per_s"]) == {"1", "2"}
    assert r["efficiency"]["1"] == 1.0 and r["efficiency"]["2"] > 0
