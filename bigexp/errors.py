"""Every error a user can cause, and the one map from error to exit status that every `bigexp` command uses.

| status | meaning                                                                          |
|--------|----------------------------------------------------------------------------------|
| 0      | done (or preempted with a checkpoint written: rerun with `--resume auto`)       |
| 1      | a bug or an environment failure: a traceback (or `bigexp doctor`: a check failed) |
| 2      | bad input: a config key, a data file, a checkpoint, an event file; nothing written |
| 3      | non-finite loss: stopped before applying that step, checkpoints intact           |
| 4      | no space left on the device while saving (previous checkpoint intact)            |
| 5      | the run directory is held by another live job (the holder is named)              |

This module imports nothing from bigexp, so every module can raise these without an import cycle.
"""
from __future__ import annotations

import errno


class BigexpError(Exception):
    """Base of the errors a user can cause; `exit_code` is the process status the CLI exits with."""
    exit_code = 1


class ConfigError(BigexpError, ValueError):
    """A config key with a bad value, type or name (the message names the key path and its file)."""
    exit_code = 2

    def __init__(self, errors: list[str] | str):
        self.errors = [errors] if isinstance(errors, str) else list(errors)
        if len(self.errors) == 1:
            msg = self.errors[0]
        else:
            msg = f"{len(self.errors)} config errors:\n" + "\n".join(f"  - {e}" for e in self.errors)
        super().__init__(msg)


class DataError(BigexpError, ValueError):
    """A data file (.beton, ImageFolder, idx, class map) that is missing, truncated, corrupt or of another schema."""
    exit_code = 2


class CheckpointError(BigexpError, RuntimeError):
    """A checkpoint that is incomplete, corrupt, or does not fit this model/run."""
    exit_code = 2


class InputFileError(BigexpError, ValueError):
    """Any other file bigexp reads (event files, probe files, manifests) that cannot be used; the message names it."""
    exit_code = 2


class NonFiniteLossError(BigexpError, RuntimeError):
    """The loss went NaN/inf; the step was not applied."""
    exit_code = 3


class DiskFullError(BigexpError, OSError):
    """ENOSPC while writing a checkpoint; the partial files were removed."""
    exit_code = 4


class RunLockedError(BigexpError, RuntimeError):
    """Another live job holds the run directory."""
    exit_code = 5


EXIT_CODES = {"ok": 0, "error": 1, "bad_input": 2, "non_finite_loss": 3, "disk_full": 4, "run_locked": 5}


def exit_code_for(exc: BaseException) -> int:
    """The status for an exception reaching the CLI: the error's own code, ENOSPC -> 4, anything else 1."""
    if isinstance(exc, BigexpError):
        return exc.exit_code
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return DiskFullError.exit_code
    return 1
