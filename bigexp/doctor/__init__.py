"""`bigexp doctor`: what to run on a new machine or cluster node before a long job.

environment.py  versions, CPU ISA, GPUs, process-group backends (no torch state changed)
numeric.py      the numeric self-checks, each run in a child process (`python -m bigexp.doctor.numeric`), so a
                crash or a hang in a kernel is reported as CRASH/HANG instead of killing the doctor
cli.py          the table and the exit status (0: every check passed, 1: one failed)
"""
