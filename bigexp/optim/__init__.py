"""Optimizers and schedules: the exponential-LR equivalence (expmath), ExpSGD, and per-step LR schedules."""
