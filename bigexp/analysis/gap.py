"""The equivalence gap between two arms, as pure functions of tensors (no I/O).

The theorem (Li & Arora 2020) says the SGD+WD arm and its exp-LR twin compute the SAME network function at every
step, and that the twin's scale-invariant weights are the baseline's divided by a scalar A_t per group, so every
invariant layer points in the same direction. These functions measure how far two arms are from that:

    max_abs_logit     max |z_a - z_b| over a probe batch (logit units; 0 = identical outputs)
    kl                mean over the batch of KL(softmax z_a || softmax z_b) (nats; >= 0)
    top1_agreement    fraction of probe images with the same arg-max class (in [0, 1])
    layer cosines     per layer <w_a, w_b> / (|w_a| |w_b|) (in [-1, 1]; 1 = same direction, whatever A_t is)
    snapshot_gap      all of them between two probe snapshots (bigexp.analysis.probes), with the eval-mode logits
                      and the non-invariant parameters' largest relative difference

Everything is computed in float64 so a gap of 1e-12 is a measurement, not float32 rounding.
Where they come from: a non-zero BN eps, non-invariant parameters (BN affine, classifier, which see the same
updates only while the function is the same), and chaos: training amplifies rounding differences exponentially.
"""
from __future__ import annotations

import math
from typing import Mapping

import torch

from bigexp.run import metrics as M


def _pair(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {tuple(a.shape)} vs {tuple(b.shape)}")
    return a.detach().to(torch.float64), b.detach().to(torch.float64)


def max_abs_logit_diff(logits_a: torch.Tensor, logits_b: torch.Tensor) -> float:
    """max |z_a - z_b| over all entries (logit units). 0 for empty inputs."""
    a, b = _pair(logits_a, logits_b)
    if a.numel() == 0:
        return 0.0
    return float((a - b).abs().max())


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |a| (dimensionless; plain max |a - b| when a is all zero, 0.0 for empty tensors): how far
    a non-invariant parameter (or an output) of the twin is from the baseline's, relative to the baseline's scale."""
    a, b = _pair(a, b)
    if a.numel() == 0:
        return 0.0
    scale = float(a.abs().max())
    d = float((a - b).abs().max())
    return d / scale if scale > 0 else d


def rel_max_abs_logit_diff(logits_a: torch.Tensor, logits_b: torch.Tensor) -> float:
    """max |z_a - z_b| / max |z_a| (dimensionless): the output gap relative to the logits' own scale."""
    a, b = _pair(logits_a, logits_b)
    if a.numel() == 0:
        return 0.0
    scale = float(a.abs().max())
    diff = float((a - b).abs().max())
    if scale == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / scale


def kl_divergence(logits_p: torch.Tensor, logits_q: torch.Tensor) -> float:
    """Mean over rows of KL(softmax(logits_p) || softmax(logits_q)) in nats; logits are [batch, classes].

    Computed from log-softmax in float64, so it stays finite for saturated softmaxes; clamped at 0 because
    rounding can give -1e-17 for identical rows.
    """
    p, q = _pair(logits_p, logits_q)
    if p.dim() != 2:
        raise ValueError(f"expected [batch, classes] logits, got shape {tuple(p.shape)}")
    if p.shape[0] == 0:
        return 0.0
    logp = torch.log_softmax(p, dim=1)
    logq = torch.log_softmax(q, dim=1)
    kl = (logp.exp() * (logp - logq)).sum(dim=1).mean()
    return max(float(kl), 0.0)


def top1_agreement(logits_a: torch.Tensor, logits_b: torch.Tensor) -> float:
    """Fraction of rows whose arg-max class is the same in both ([0, 1]); 1.0 for an empty batch."""
    a, b = _pair(logits_a, logits_b)
    if a.dim() != 2:
        raise ValueError(f"expected [batch, classes] logits, got shape {tuple(a.shape)}")
    if a.shape[0] == 0:
        return 1.0
    return float((a.argmax(dim=1) == b.argmax(dim=1)).double().mean())


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """<a, b> / (|a| |b|) of the flattened tensors, in [-1, 1]. Two zero tensors count as aligned (1.0);
    one zero tensor against a non-zero one as 0.0."""
    a, b = _pair(a.reshape(-1), b.reshape(-1))
    na, nb = float(a.norm()), float(b.norm())
    if na == 0.0 or nb == 0.0:
        return 1.0 if na == nb else 0.0
    return max(-1.0, min(1.0, float(a @ b) / (na * nb)))


def direction_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    """| a/|a| - b/|b| | (in [0, 2]): how far apart the directions are, linear in the angle for small angles.

    Preferred to 1 - cosine for tiny gaps: 1 - cos(θ) ≈ θ²/2 falls below float64 resolution (1e-16) already at
    θ ≈ 1e-8, while this stays ≈ θ."""
    a, b = _pair(a.reshape(-1), b.reshape(-1))
    na, nb = float(a.norm()), float(b.norm())
    if na == 0.0 or nb == 0.0:
        return 0.0 if na == nb else 1.0
    return float((a / na - b / nb).norm())


def layer_cosines(weights_a: Mapping[str, torch.Tensor], weights_b: Mapping[str, torch.Tensor]) -> dict:
    """Cosine per layer name present in both mappings (name -> flattened weight); a name in only one is an error,
    because it means the arms are different networks."""
    missing = set(weights_a) ^ set(weights_b)
    if missing:
        raise ValueError(f"layers present in only one arm: {sorted(missing)[:5]}")
    return {name: cosine(weights_a[name], weights_b[name]) for name in weights_a}


def layer_direction_gaps(weights_a: Mapping[str, torch.Tensor], weights_b: Mapping[str, torch.Tensor]) -> dict:
    missing = set(weights_a) ^ set(weights_b)
    if missing:
        raise ValueError(f"layers present in only one arm: {sorted(missing)[:5]}")
    return {name: direction_gap(weights_a[name], weights_b[name]) for name in weights_a}


def gap_metrics(logits_a: torch.Tensor, logits_b: torch.Tensor,
                weights_a: Mapping[str, torch.Tensor] | None = None,
                weights_b: Mapping[str, torch.Tensor] | None = None) -> dict:
    """All gap scalars for one probe step, keyed by their TensorBoard tags (bigexp.run.metrics.GAP_TAGS).

    Arm a is the baseline (p in the KL), arm b the twin. Weight metrics are left out when no weights are given
    (or the mappings are empty).
    """
    out = {
        M.GAP_MAX_ABS_LOGIT: max_abs_logit_diff(logits_a, logits_b),
        M.GAP_REL_MAX_ABS_LOGIT: rel_max_abs_logit_diff(logits_a, logits_b),
        M.GAP_KL: kl_divergence(logits_a, logits_b),
        M.GAP_TOP1_AGREEMENT: top1_agreement(logits_a, logits_b),
    }
    if weights_a and weights_b:
        cos = layer_cosines(weights_a, weights_b)
        dirs = layer_direction_gaps(weights_a, weights_b)
        out[M.GAP_MIN_LAYER_COSINE] = min(cos.values())
        out[M.GAP_MEAN_LAYER_COSINE] = sum(cos.values()) / len(cos)
        out[M.GAP_MAX_DIRECTION_GAP] = max(dirs.values())
    return out


def snapshot_gap(a: Mapping, b: Mapping) -> dict:
    """Gap scalars between two probe snapshots (a = baseline; bigexp.analysis.probes.snapshot): batch-statistics
    logits, eval logits, invariant layers' cosines/direction gaps and the largest relative difference of the
    non-invariant parameters."""
    inv = set(a.get("invariant", [])) & set(b.get("invariant", []))
    wa = {n: w for n, w in a["weights"].items() if n in inv}
    wb = {n: w for n, w in b["weights"].items() if n in inv}
    out = gap_metrics(a["logits"], b["logits"], wa, wb)
    out[M.GAP_EVAL_MAX_ABS_LOGIT] = max_abs_logit_diff(a["logits_eval"], b["logits_eval"])
    out[M.GAP_EVAL_KL] = kl_divergence(a["logits_eval"], b["logits_eval"])
    out[M.GAP_EVAL_TOP1_AGREEMENT] = top1_agreement(a["logits_eval"], b["logits_eval"])
    plain = [n for n in a["weights"] if n not in inv and n in b["weights"]]
    if plain:
        out[M.GAP_MAX_PLAIN_REL_DIFF] = max(rel_diff(a["weights"][n], b["weights"][n]) for n in plain)
    return out
