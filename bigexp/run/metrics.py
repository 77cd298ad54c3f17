"""TensorBoard logging on rank 0 (a no-op elsewhere), and THE table of tag names.

Every writer (the loop, `step.evaluate`, `optim.build.group_stats`, compare's logger and gap run) and every reader
(`bigexp report`, the plots, compare's custom-scalars layout, tests) names a tag through the constants and functions
below, never through a string of its own. x axis = optimizer step for every scalar, so arms overlay.

  train/loss, train/img_per_s, train/step_time_s, train/grad_norm, train/loss_scale (fp16), train/epoch (fractional)
  opt/<group>/{base_lr, applied_lr, effective_lr, weight_norm, log_A, renorm_count}   one set per param group
  opt/<group>/log10_{applied_lr, effective_lr, weight_norm}   compare only: TensorBoard has no per-chart log axis
  val/top1, val/top5, val/loss          (percent for top-k)
  theory/<group>/{angular_update, angular_equilibrium, intrinsic_lr}   invariant groups (bigexp.run.angular)
  events/renorm                         (renormalisations since the previous log line, where there were any)
  hparam/{top1, top5, loss}             the final val metrics beside the run's hparams
  gap/...                               the equivalence gap between a compare's arms (its own run, gap/)
  text: config (the resolved YAML), invariance (the param-group report)

This module imports nothing from bigexp (and TensorBoard only when a logger is enabled), so any module can use the
table without an import cycle or a heavy import.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Optional

# ---------------------------------------------------------------------------------------------- tag table
TRAIN_PREFIX, VAL_PREFIX, OPT_PREFIX, EVENTS_PREFIX, HPARAM_PREFIX, GAP_PREFIX, THEORY_PREFIX = (
    "train/", "val/", "opt/", "events/", "hparam/", "gap/", "theory/")

TRAIN_LOSS = "train/loss"
TRAIN_IMG_PER_S = "train/img_per_s"
TRAIN_STEP_TIME_S = "train/step_time_s"
TRAIN_GRAD_NORM = "train/grad_norm"
TRAIN_LOSS_SCALE = "train/loss_scale"
TRAIN_EPOCH = "train/epoch"
VAL_TOP1 = "val/top1"
VAL_TOP5 = "val/top5"
VAL_LOSS = "val/loss"
EVENTS_RENORM = "events/renorm"
TEXT_CONFIG = "config"
TEXT_INVARIANCE = "invariance"

TAGS_TRAIN = (TRAIN_LOSS, TRAIN_IMG_PER_S, TRAIN_STEP_TIME_S, TRAIN_GRAD_NORM, TRAIN_LOSS_SCALE)
TAGS_VAL = (VAL_TOP1, VAL_TOP5, VAL_LOSS)

# opt/<group>/<stat>: the per-group statistics (names as ExpSGD.group_stats returns them)
BASE_LR, APPLIED_LR, EFFECTIVE_LR, WEIGHT_NORM, LOG_A, RENORM_COUNT = (
    "base_lr", "applied_lr", "effective_lr", "weight_norm", "log_A", "renorm_count")
OPT_STATS = (BASE_LR, APPLIED_LR, EFFECTIVE_LR, WEIGHT_NORM, LOG_A, RENORM_COUNT)
LOG10_PREFIX = "log10_"
LOG10_STATS = (APPLIED_LR, EFFECTIVE_LR, WEIGHT_NORM)  # spanning orders of magnitude: compare adds log10_<stat>

# theory/<group>/<stat>: an invariant group's measured angular update Delta_t (radians, the angle between w_t and
# w_{t+1}), its equilibrium prediction sqrt(2*eta*lambda/(1+gamma)), the intrinsic LR eta*lambda
ANGULAR_UPDATE, ANGULAR_EQUILIBRIUM, INTRINSIC_LR = "angular_update", "angular_equilibrium", "intrinsic_lr"
THEORY_STATS = (ANGULAR_UPDATE, ANGULAR_EQUILIBRIUM, INTRINSIC_LR)

GAP_MAX_ABS_LOGIT = "gap/max_abs_logit"
GAP_REL_MAX_ABS_LOGIT = "gap/rel_max_abs_logit"
GAP_KL = "gap/kl"
GAP_TOP1_AGREEMENT = "gap/top1_agreement"
GAP_MIN_LAYER_COSINE = "gap/min_layer_cosine"
GAP_MEAN_LAYER_COSINE = "gap/mean_layer_cosine"
GAP_MAX_DIRECTION_GAP = "gap/max_direction_gap"
GAP_EVAL_MAX_ABS_LOGIT = "gap/eval_max_abs_logit"
GAP_EVAL_KL = "gap/eval_kl"
GAP_EVAL_TOP1_AGREEMENT = "gap/eval_top1_agreement"
GAP_MAX_PLAIN_REL_DIFF = "gap/max_plain_rel_diff"
GAP_TAGS = (GAP_MAX_ABS_LOGIT, GAP_REL_MAX_ABS_LOGIT, GAP_KL, GAP_TOP1_AGREEMENT, GAP_MIN_LAYER_COSINE,
            GAP_MEAN_LAYER_COSINE, GAP_MAX_DIRECTION_GAP)


def opt_tag(group: str, stat: str) -> str:
    """`opt/<group>/<stat>`, e.g. opt_tag("scale_invariant", APPLIED_LR)."""
    return f"{OPT_PREFIX}{group}/{stat}"


def split_opt_tag(tag: str) -> Optional[tuple[str, str]]:
    """(group, stat) of an `opt/<group>/<stat>` tag; None for any other tag."""
    return _split_group_tag(OPT_PREFIX, tag)


def _split_group_tag(prefix: str, tag: str) -> Optional[tuple[str, str]]:
    """(group, stat) of `<prefix><group>/<stat>` (a group name may hold '/': the stat is the last part)."""
    if not tag.startswith(prefix):
        return None
    group, sep, stat = tag[len(prefix):].rpartition("/")
    return (group, stat) if sep and group else None


def opt_stat(tag: str) -> Optional[str]:
    """The <stat> of an `opt/<group>/<stat>` tag; None for any other tag."""
    parts = split_opt_tag(tag)
    return parts[1] if parts else None


def theory_tag(group: str, stat: str) -> str:
    """`theory/<group>/<stat>`, e.g. theory_tag("scale_invariant", ANGULAR_UPDATE)."""
    return f"{THEORY_PREFIX}{group}/{stat}"


def split_theory_tag(tag: str) -> Optional[tuple[str, str]]:
    """(group, stat) of a `theory/<group>/<stat>` tag; None for any other tag."""
    return _split_group_tag(THEORY_PREFIX, tag)


def theory_tag_regex(stat: str, group: str = "(.+)") -> str:
    """A regex matching theory/<group>/<stat>, the group the first capture group (as `opt_tag_regex`)."""
    return f"^{re.escape(THEORY_PREFIX)}{group}/{re.escape(stat)}$"


def log10_tag(tag: str) -> str:
    """opt/<group>/<stat> -> opt/<group>/log10_<stat>."""
    head, _, stat = tag.rpartition("/")
    return f"{head}/{LOG10_PREFIX}{stat}"


def opt_tag_regex(stat: str, group: str = "(.+)") -> str:
    """A regex matching opt/<group>/<stat> for every group; by default the group is the first capture group
    (plots: one line per group). Pass group=".*" for no capture (the custom-scalars layout)."""
    return f"^{re.escape(OPT_PREFIX)}{group}/{re.escape(stat)}$"


def tag_regex(tag: str) -> str:
    """A regex matching exactly this tag (custom-scalars layouts take regexes)."""
    return f"^{re.escape(tag)}$"


def hparam_tag(tag: str) -> str:
    """The hparam metric of a val tag: val/top1 -> hparam/top1."""
    return HPARAM_PREFIX + tag.split("/")[1]


# ---------------------------------------------------------------------------------------------- logger
class TBLogger:
    """Rank 0's event writer. Logging is not the job: the first OSError from TensorBoard (ENOSPC, a quota, a network
    filesystem gone) is warned about once and turns the logger off for the rest of the run; training goes on.

    TensorBoard writes from a background thread; when that thread dies it drains its queue (so no caller blocks on
    a full one) and its error surfaces at the next add/flush/close here, which is where it is caught.
    """

    def __init__(self, log_dir: Path | str, enabled: bool = True):
        self.writer = None
        self.log_dir = Path(log_dir)
        self.failed: Optional[OSError] = None   # the error that turned the logger off, if any
        if enabled:
            # TensorBoard is imported only for an enabled logger: ranks other than 0, and the tag table's users,
            # never pay for it.
            from torch.utils.tensorboard import SummaryWriter

            try:
                self.log_dir.mkdir(parents=True, exist_ok=True)
                self.writer = SummaryWriter(log_dir=str(log_dir))
            except OSError as exc:
                self._disable(exc)

    def _disable(self, exc: OSError) -> None:
        """Warn once, drop the writer (closing it may raise the same error again: ignored)."""
        self.failed = exc
        writer, self.writer = self.writer, None
        warnings.warn(f"TensorBoard logging to {self.log_dir} failed ({exc}); it is off for the rest of this run, "
                      f"training goes on", RuntimeWarning, stacklevel=3)
        if writer is not None:
            try:
                writer.close()
            except OSError:
                pass

    def _write(self, fn, *args, **kwargs) -> None:
        if self.writer is None:
            return
        try:
            fn(*args, **kwargs)
        except OSError as exc:
            self._disable(exc)

    def scalars(self, step: int, values: dict) -> None:
        self._write(self._scalars, step, values)

    def _scalars(self, step: int, values: dict) -> None:
        for tag, v in values.items():
            if v is not None:
                self.writer.add_scalar(tag, float(v), global_step=step)

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self.writer is not None:
            # Markdown: indent by 4 so YAML/tables render verbatim in TensorBoard's text tab.
            self._write(self.writer.add_text, tag, "\n".join("    " + line for line in text.splitlines()),
                        global_step=step)

    def hparams(self, hparams: dict, metrics: dict) -> None:
        """Write hparams into THIS run's event file (SummaryWriter.add_hparams would create a sub-run)."""
        self._write(self._hparams, hparams, metrics)

    def _hparams(self, hparams: dict, metrics: dict) -> None:
        from torch.utils.tensorboard.summary import hparams as hp_summary  # a writer exists: already imported

        clean = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in hparams.items()}
        exp, ssi, sei = hp_summary(clean, metrics)
        fw = self.writer._get_file_writer()
        fw.add_summary(exp)
        fw.add_summary(ssi)
        fw.add_summary(sei)
        for k, v in metrics.items():
            self.writer.add_scalar(k, v)

    def flush(self) -> None:
        if self.writer is not None:
            self._write(self.writer.flush)

    def close(self) -> None:
        if self.writer is not None:
            self._write(self.writer.close)
            self.writer = None
