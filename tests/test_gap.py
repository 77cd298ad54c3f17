"""bigexp.analysis.gap on hand-made tensors whose answers are known in closed form."""
import math

import pytest
import torch

from bigexp.analysis import gap


def test_identical_logits_have_zero_gap():
    z = torch.tensor([[1.0, 2.0, -3.0], [0.5, 0.5, 0.0]])
    m = gap.gap_metrics(z, z.clone())
    assert m["gap/max_abs_logit"] == 0.0
    assert m["gap/rel_max_abs_logit"] == 0.0
    assert m["gap/kl"] == 0.0
    assert m["gap/top1_agreement"] == 1.0
    assert "gap/min_layer_cosine" not in m  # no weights given


def test_max_abs_logit_and_relative():
    a = torch.tensor([[1.0, -4.0], [2.0, 0.0]])
    b = torch.tensor([[1.5, -4.0], [2.0, 0.25]])
    assert gap.max_abs_logit_diff(a, b) == pytest.approx(0.5)
    assert gap.rel_max_abs_logit_diff(a, b) == pytest.approx(0.5 / 4.0)


def test_kl_matches_closed_form():
    # Two classes: p = softmax([0, 0]) = (1/2, 1/2), q = softmax([0, log 3]) = (1/4, 3/4).
    p = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    q = torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float64)
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert gap.kl_divergence(p, q) == pytest.approx(expected, rel=1e-12)
    # KL is invariant to a per-row shift of the logits (softmax is), and not symmetric.
    assert gap.kl_divergence(p + 7.0, q - 3.0) == pytest.approx(expected, rel=1e-12)
    assert gap.kl_divergence(q, p) != pytest.approx(expected, rel=1e-3)


def test_kl_is_mean_over_rows_and_finite_when_saturated():
    p = torch.tensor([[0.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    q = torch.tensor([[0.0, 0.0], [0.0, math.log(3.0)]], dtype=torch.float64)
    one = 0.5 * math.log(2.0) + 0.5 * math.log(2.0 / 3.0)
    assert gap.kl_divergence(p, q) == pytest.approx(one / 2, rel=1e-12)
    sat = gap.kl_divergence(torch.tensor([[1000.0, -1000.0]]), torch.tensor([[-1000.0, 1000.0]]))
    assert math.isfinite(sat) and sat == pytest.approx(2000.0, rel=1e-9)


def test_top1_agreement_counts_rows():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0], [0.0, 3.0]])
    b = torch.tensor([[1.0, 0.0], [1.0, 0.0], [2.0, 1.0], [0.0, 3.0]])
    assert gap.top1_agreement(a, b) == 0.75


def test_cosine_and_direction_gap_ignore_scale():
    # float64 and a non-power-of-two scale: the products round, at the 1e-16 level.
    w = torch.randn(8, 3, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert gap.cosine(w, 1e6 * w) == pytest.approx(1.0, abs=1e-15)
    assert gap.direction_gap(w, 1e-6 * w) < 1e-15
    assert gap.cosine(w, -w) == pytest.approx(-1.0, abs=1e-15)
    assert gap.direction_gap(w, -w) == pytest.approx(2.0)
    # Orthogonal unit vectors: cosine 0, direction gap sqrt(2).
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 3.0])
    assert gap.cosine(e1, e2) == 0.0
    assert gap.direction_gap(e1, e2) == pytest.approx(math.sqrt(2.0))


def test_direction_gap_resolves_tiny_angles_that_cosine_cannot():
    theta = 1e-9
    a = torch.tensor([1.0, 0.0], dtype=torch.float64)
    b = torch.tensor([math.cos(theta), math.sin(theta)], dtype=torch.float64)
    assert gap.direction_gap(a, b) == pytest.approx(theta, rel=1e-6)
    assert 1.0 - gap.cosine(a, b) < 1e-15  # 1 - cos = theta^2/2 = 5e-19: below float64 resolution


def test_layer_metrics_in_gap_metrics():
    wa = {"conv1": torch.tensor([1.0, 0.0]), "conv2": torch.tensor([1.0, 1.0])}
    wb = {"conv1": torch.tensor([2.0, 0.0]), "conv2": torch.tensor([1.0, -1.0])}
    z = torch.zeros(2, 3)
    m = gap.gap_metrics(z, z, wa, wb)
    assert m["gap/min_layer_cosine"] == pytest.approx(0.0, abs=1e-15)
    assert m["gap/mean_layer_cosine"] == pytest.approx(0.5)
    assert m["gap/max_direction_gap"] == pytest.approx(math.sqrt(2.0))


def test_mismatched_inputs_are_errors():
    with pytest.raises(ValueError, match="shape mismatch"):
        gap.max_abs_logit_diff(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="only one arm"):
        gap.layer_cosines({"a": torch.ones(2)}, {"b": torch.ones(2)})


def test_zero_weights():
    assert gap.cosine(torch.zeros(3), torch.zeros(3)) == 1.0
    assert gap.cosine(torch.zeros(3), torch.ones(3)) == 0.0
