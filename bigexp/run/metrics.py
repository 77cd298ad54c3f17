"""TensorBoard logging on rank 0 (a no-op elsewhere), with the tag names `bigexp report` reads back.

Tags (x axis = optimizer step for every scalar, so arms overlay):
  train/loss, train/img_per_s, train/step_time_s, train/grad_norm, train/loss_scale, train/epoch
  opt/<group>/{base_lr, applied_lr, effective_lr, weight_norm, log_A, renorm_count}
  val/top1, val/top5, val/loss          (percent for top-k)
  events/renorm                         (1 at each step where a renormalisation happened)
  text: config (the resolved YAML), invariance (the param-group report)
"""
from __future__ import annotations

from pathlib import Path

TAGS_TRAIN = ("train/loss", "train/img_per_s", "train/step_time_s", "train/grad_norm", "train/loss_scale")
TAGS_VAL = ("val/top1", "val/top5", "val/loss")


class TBLogger:
    def __init__(self, log_dir: Path | str, enabled: bool = True):
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            Path(log_dir).mkdir(parents=True, exist_ok=True)
            self.writer = SummaryWriter(log_dir=str(log_dir))

    def scalars(self, step: int, values: dict) -> None:
        if self.writer is None:
            return
        for tag, v in values.items():
            if v is not None:
                self.writer.add_scalar(tag, float(v), global_step=step)

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self.writer is not None:
            # Markdown: indent by 4 so YAML/tables render verbatim in TensorBoard's text tab.
            self.writer.add_text(tag, "\n".join("    " + line for line in text.splitlines()), global_step=step)

    def hparams(self, hparams: dict, metrics: dict) -> None:
        """Write hparams into THIS run's event file (SummaryWriter.add_hparams would create a sub-run)."""
        if self.writer is None:
            return
        from torch.utils.tensorboard.summary import hparams as hp_summary

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
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
