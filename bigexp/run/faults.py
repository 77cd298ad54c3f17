"""Test-only fault injection: every hook the reliability tests use, as one object read once from the environment.

Real runs set none of these variables, so every field is None (off). A set variable turns its hook on, with its value
taken as is (`0` is a step like any other, not "off"):

  BIGEXP_TEST_NAN_AT_STEP=N            step N (1-based, as logged) gets NaN inputs, so its loss is NaN
  BIGEXP_TEST_STEP_DELAY_S=S           sleep S seconds after each step, so a test can signal a run mid-flight
  BIGEXP_TEST_SLEEP_IN_SAVE_AT_STEP=N  the save of step N sleeps an hour on rank 0 after every rank has written its
                                       files and before the manifest and the rename, so a test can kill it there
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping, Optional

ENV_NAN_AT_STEP = "BIGEXP_TEST_NAN_AT_STEP"
ENV_STEP_DELAY_S = "BIGEXP_TEST_STEP_DELAY_S"
ENV_SLEEP_IN_SAVE_AT_STEP = "BIGEXP_TEST_SLEEP_IN_SAVE_AT_STEP"


@dataclass(frozen=True)
class Faults:
    nan_at_step: Optional[int] = None              # global step (1-based) whose inputs become NaN
    step_delay_s: Optional[float] = None           # seconds slept after every optimizer step
    sleep_in_save_at_step: Optional[int] = None    # global step whose checkpoint save hangs before its rename

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> "Faults":
        def read(name, kind):
            value = environ.get(name, "")
            return kind(value) if value != "" else None

        return cls(nan_at_step=read(ENV_NAN_AT_STEP, int), step_delay_s=read(ENV_STEP_DELAY_S, float),
                   sleep_in_save_at_step=read(ENV_SLEEP_IN_SAVE_AT_STEP, int))


NO_FAULTS = Faults()
