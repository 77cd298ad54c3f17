"""Comparing arms: the runner, lockstep, probes and gap, verify, reports and plots."""
