"""`bigexp doctor`: the table, the JSON, and its exit status on a machine where a check fails.

The failing machine is made by emulation: ONEDNN_MAX_CPU_ISA=AVX2 sends oneDNN down the AVX2 kernels, where the
width-4 fmnist_resnet's 1x1 stride-2 shortcut on channels-last crashes or returns wrong gradients (oneDNN #6035).
The doctor must report that (the guard's refusal, and the gradient check's CRASH/HANG/FAIL), not die of it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow  # each doctor run builds the net three times and runs float64 references (~30 s)


def doctor(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bigexp", "doctor", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


def test_healthy_machine_json_and_exit_0():
    r = doctor("--json", "--config", "configs/fmnist/main.yaml", "run.threads=2")
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    env = out["environment"]
    assert env["torch"].startswith(__import__("torch").__version__) and env["process group"] == "gloo"
    assert env["deepspeed"] != "not installed" and env["ffcv"] != "not installed"
    checks = out["checks"]
    grads = checks["gradients fmnist_resnet fp32 channels-last"]  # main.yaml: model.channels_last true
    assert grads["status"] == "ok" and grads["value"] < 1e-4
    assert checks["scale invariance"]["status"] == "ok" and "invariant sets" in checks["scale invariance"]["detail"]
    assert checks["memory format"]["status"] == "ok" and out["ok"] is True


def test_bf16_config_checks_both_precisions_in_the_table():
    r = doctor("engine.precision=bf16", "run.threads=2")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "gradients fmnist_resnet fp32 NCHW" in r.stdout and "gradients fmnist_resnet bf16 NCHW" in r.stdout
    assert r.stdout.rstrip().endswith("all checks passed")


def test_onednn_6035_machine_fails_with_exit_1_and_names_the_layer():
    r = doctor("model.width=4", "model.channels_last=true", "run.threads=1", "--timeout", "60",
               env={"ONEDNN_MAX_CPU_ISA": "AVX2"})
    assert r.returncode == 1, r.stdout + r.stderr
    lines = {ln.split()[0] + " " + ln.split()[1]: ln for ln in r.stdout.splitlines() if len(ln.split()) > 2}
    assert "FAIL" in lines["memory format"] and "layer2.0.downsample.0" in lines["memory format"]
    grad = next(ln for ln in r.stdout.splitlines() if "gradients fmnist_resnet fp32 channels-last" in ln)
    # CRASH with one thread on AVX2 today; a fixed torch would show ok here and only the guard's FAIL remain.
    assert any(s in grad for s in ("CRASH", "HANG", "FAIL", " ok ")), grad
    assert "FAILED: memory format" in r.stdout


def test_a_relu_on_its_kink_is_a_flip_not_a_kernel_error():
    # fp32 rounds 1 + 1e-8 to 1, so w.x is 0 there and 1e-8 in float64: the ReLU takes the other branch, and the
    # gradients would differ by 100 % with no kernel at fault (what made the doctor FAIL fmnist_resnet at 28 px,
    # batch seed 0, on a healthy Xeon). The doctor skips such a batch; one a float away from the kink is judged.
    import torch

    from bigexp.doctor.numeric import _flips

    net = torch.nn.Sequential(torch.nn.Linear(2, 1, bias=False), torch.nn.ReLU())
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, -1.0]]))
    spec = {"dtype": "fp32", "device": "cpu", "channels_last": False}
    on_kink = torch.tensor([[1 + 1e-8, 1.0]], dtype=torch.float64)
    assert _flips(net, on_kink, spec) == 1
    assert _flips(net, torch.tensor([[1.5, 1.0]], dtype=torch.float64), spec) == 0
