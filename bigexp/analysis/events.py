"""TensorBoard event files of a comparison: reading scalars back, writing the layout and the gap run, naming the runs.

Layout of one comparison, a single TensorBoard logdir <run.out_dir>/<run.name>/:
    <arm>/          one run per arm in compare.arms (sgd, expsgd): events, config.yaml, checkpoints, probes/
    sgd_perturbed/  (CONTROL_ARM, compare.control) the baseline started from weights nudged by float32 round-off
    gap/            (GAP_RUN) the equivalence gap between the arms on a fixed probe batch, per probe step
    gap_control/    (GAP_CONTROL_RUN) the same gap tags between the control and the baseline: the chaos floor
    events.*.bigexp-layout   (LAYOUT_FILE) the custom-scalars layout: each metric (per param group) of all arms overlaid
    report.md, plots/        written by `bigexp report`
With compare.seeds of two or more seeds every run above is one directory deeper, one per seed: <arm>/seed<s>/,
gap/seed<s>/, gap_control/seed<s>/ (`seed_run`); TensorBoard names those runs "sgd/seed0", so its run filter
picks one seed ("seed0") or one arm ("^sgd/").

Reading is strict where TensorBoard is lenient: its loader stops silently at the first bad record, so a corrupt file
would show as a run that ended early. Here a record failing its CRC (or not parsing) raises InputFileError naming the
file; only an incomplete LAST record is accepted, since that is what a run still writing its events looks like.

TensorBoard and torch's SummaryWriter are imported inside the functions that use them: `bigexp report` should not
pay for them before it has parsed its arguments, and nothing here needs torch just to be imported.
"""
from __future__ import annotations

import math
import os
import re
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

from bigexp.errors import InputFileError
from bigexp.run import metrics as M
from bigexp.run.metrics import TBLogger

LAYOUT_FILE = "events.out.tfevents.0000000000.bigexp-layout"
GAP_FILE = "events.out.tfevents.0000000000.bigexp-gap"
GAP_RUN = "gap"
BASELINE_ARM = "sgd"   # the arm the others are measured against (table differences, gap): the step-decay baseline
CONTROL_ARM = "sgd_perturbed"   # compare.control: the baseline from nudged weights (bigexp.analysis.control)
GAP_CONTROL_RUN = "gap_control"
SEED_DIR = "seed{}"
_SEED_RX = re.compile(r"^seed(\d+)$")

_HEADER = struct.Struct("<QI")   # TFRecord: uint64 length, uint32 masked CRC32C of the length
_CRC = struct.Struct("<I")       # then the data, then the masked CRC32C of the data


def baseline_and_twin(arms: Sequence[str]) -> tuple[str, Optional[str]]:
    """(baseline, twin) of a comparison's arms: BASELINE_ARM when present, else the first; the twin is the first
    other arm (None for a single arm)."""
    base = BASELINE_ARM if BASELINE_ARM in arms else arms[0]
    return base, next((a for a in arms if a != base), None)


def seed_run(run: str, seed: Optional[int]) -> str:
    """The run directory (relative to the logdir) of an arm or gap run for one seed: `run` itself for a
    single-seed comparison (seed None), else <run>/seed<s>."""
    return run if seed is None else f"{run}/{SEED_DIR.format(seed)}"


def split_seed_run(name: str) -> tuple[str, Optional[int]]:
    """("sgd", 1) for the run name "sgd/seed1", ("sgd", None) for "sgd": seed_run's inverse."""
    head, _, tail = name.rpartition("/")
    m = _SEED_RX.match(tail)
    return (head, int(m.group(1))) if head and m else (name, None)


def seed_dirs(d: Path) -> dict:
    """seed -> <d>/seed<s> for every seed subdirectory of d holding event files, by seed."""
    d = Path(d)
    if not d.is_dir():
        return {}
    out = {}
    for c in d.iterdir():
        m = _SEED_RX.match(c.name)
        if m and c.is_dir() and has_event_files(c):
            out[int(m.group(1))] = c
    return dict(sorted(out.items()))


# ---------------------------------------------------------------------------------------------- reading
def event_files(run_dir: Path) -> list[Path]:
    """The event files directly in run_dir, in name order (TensorBoard's order: one file per writer session)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    return sorted(p for p in run_dir.iterdir() if p.is_file() and "tfevents" in p.name)


def has_event_files(d: Path) -> bool:
    return bool(event_files(d))


def _records(path: Path) -> Iterator[bytes]:
    """The TFRecord payloads of one file, CRC-checked; an incomplete last record (a writer mid-append) ends it."""
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise InputFileError(f"{path}: cannot read this event file ({e.strerror or e})") from None
    pos = 0
    while pos + _HEADER.size <= len(data):
        length, crc = _HEADER.unpack_from(data, pos)
        if masked_crc32c(data[pos:pos + 8]) != crc:
            raise InputFileError(f"{path}: corrupt event file (bad record header at byte {pos}); "
                                 f"move it away to report the rest")
        start, end = pos + _HEADER.size, pos + _HEADER.size + length
        if end + _CRC.size > len(data):
            return
        payload = data[start:end]
        if masked_crc32c(payload) != _CRC.unpack_from(data, end)[0]:
            raise InputFileError(f"{path}: corrupt event file (bad record at byte {pos}); move it away to report "
                                 f"the rest")
        yield payload
        pos = end + _CRC.size


def read_events(path: Path) -> Iterator:
    """Event protos of one event file (see _records for what counts as corrupt)."""
    from google.protobuf.message import DecodeError
    from tensorboard.compat.proto.event_pb2 import Event

    for raw in _records(path):
        try:
            yield Event.FromString(raw)
        except DecodeError:
            raise InputFileError(f"{path}: corrupt event file (a record is not an Event)") from None


def load_scalar_events(run_dir: Path | str) -> dict:
    """tag -> (steps, values, wall_times) of every scalar in the event files of `run_dir` (not its subdirectories),
    by step, with each kept event's wall time (s since epoch).

    A step logged twice (a resumed run repeats the steps after its last checkpoint) keeps the later write.
    Tags with no step-wise meaning (hparam/*) are left out.
    """
    records: dict = {}   # tag -> [(wall_time, step, value)] in file order
    for path in event_files(Path(run_dir)):
        for ev in read_events(path):
            for v in ev.summary.value:
                if v.HasField("simple_value") and not v.tag.startswith(M.HPARAM_PREFIX):
                    records.setdefault(v.tag, []).append((float(ev.wall_time), int(ev.step), float(v.simple_value)))
    out = {}
    for tag, recs in records.items():
        latest: dict = {}
        for wall, step, value in sorted(recs, key=lambda r: r[0]):  # stable: equal times keep file order
            latest[step] = (value, wall)
        steps = sorted(latest)
        out[tag] = (steps, [latest[s][0] for s in steps], [latest[s][1] for s in steps])
    return out


def load_scalars(run_dir: Path | str) -> dict:
    """tag -> (steps, values): `load_scalar_events` without the wall times."""
    return {tag: (steps, values) for tag, (steps, values, _) in load_scalar_events(run_dir).items()}


# ---------------------------------------------------------------------------------------------- writing
def write_events_atomic(target_dir: Path, final_name: str, write: Callable) -> Path:
    """Run `write(SummaryWriter)` into a private temp dir beside target_dir, then os.replace the event file to
    target_dir/final_name: rewriting the layout or the gap run never leaves a half file or a duplicate."""
    from torch.utils.tensorboard import SummaryWriter

    target_dir = Path(target_dir)
    target_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-events-", dir=target_dir))
    try:
        w = SummaryWriter(log_dir=str(tmp))
        try:
            write(w)
        finally:
            w.close()
        files = [p for p in tmp.iterdir() if "tfevents" in p.name]
        if len(files) != 1:
            raise RuntimeError(f"expected one event file in {tmp}, found {len(files)}")
        with open(files[0], "rb+") as fh:
            os.fsync(fh.fileno())
        final = target_dir / final_name
        os.replace(files[0], final)
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_gap_run(logdir: Path, rows: list, run: str = GAP_RUN) -> Optional[Path]:
    """The gap rows [{"step": s, "gap/...": v}] as the run `run` (GAP_RUN, GAP_CONTROL_RUN, gap/seed<s>, ...) of
    logdir (finite values only); None if no rows."""
    if not rows:
        return None

    def write(w):
        for r in rows:
            for k, v in r.items():
                if k != "step" and v is not None and math.isfinite(v):
                    w.add_scalar(k, float(v), global_step=r["step"])

    return write_events_atomic(Path(logdir) / run, GAP_FILE, write)


# ---------------------------------------------------------------------------------------------- arms' logging
def log10_scalars(values: dict) -> dict:
    """For opt/<group>/{applied_lr, effective_lr, weight_norm}: the same value as log10_<name> (TensorBoard has
    no per-chart log axis, and the twin's LR grows by orders of magnitude)."""
    out = {}
    for tag, v in values.items():
        parts = M.split_opt_tag(tag)
        if v is None or parts is None or parts[1] not in M.LOG10_STATS:
            continue
        v = float(v)
        if v > 0 and math.isfinite(v):
            out[M.log10_tag(tag)] = math.log10(v)
    return out


class CompareLogger(TBLogger):
    """TBLogger that adds opt/<group>/log10_* beside the linear values."""

    def scalars(self, step: int, values: dict) -> None:
        super().scalars(step, {**values, **log10_scalars(values)})


# ---------------------------------------------------------------------------------------------- the layout
def custom_scalars_layout(title: str, group_tags: Sequence[str] = ()) -> dict:
    """The charts (SummaryWriter.add_custom_scalars format): tags are regexes, matched in every run of the logdir,
    so each chart overlays that metric of all arms (and seeds). `group_tags` (the opt/<group>/<stat> and
    theory/<group>/<stat> tags the arms logged) add one category per param group, one chart per stat, and per
    invariant group a theory category: the measured angular update beside its equilibrium prediction.
    No chart holds two param groups: TensorBoard colours a line by its run, so two groups of one arm in one chart
    could not be told apart."""
    def tags(*names):
        return ["Multiline", [M.tag_regex(t) for t in names]]

    layout = {
        f"compare: {title}": {
            "val top-1 (%)": tags(M.VAL_TOP1),
            "val top-5 (%)": tags(M.VAL_TOP5),
            "train loss": tags(M.TRAIN_LOSS),
            "val loss": tags(M.VAL_LOSS),
            "throughput img/s": tags(M.TRAIN_IMG_PER_S),
        },
        "equivalence gap (probe batch)": {
            "max |Δ logit| (batch statistics)": tags(M.GAP_MAX_ABS_LOGIT, M.GAP_EVAL_MAX_ABS_LOGIT),
            "KL(p_base || p_twin)": tags(M.GAP_KL, M.GAP_EVAL_KL),
            "top-1 agreement": tags(M.GAP_TOP1_AGREEMENT, M.GAP_EVAL_TOP1_AGREEMENT),
            "layer cosine (min, mean)": tags(M.GAP_MIN_LAYER_COSINE, M.GAP_MEAN_LAYER_COSINE),
            "max layer direction gap |u_a - u_b|": tags(M.GAP_MAX_DIRECTION_GAP),
            "non-invariant params: max relative difference": tags(M.GAP_MAX_PLAIN_REL_DIFF),
        },
    }
    tag_set = set(group_tags)
    for tag in sorted(tag_set):
        if M.split_opt_tag(tag) is not None:
            group, stat = M.split_opt_tag(tag)
            layout.setdefault(f"param group {group}", {})[f"{group}: {stat}"] = tags(tag)
        elif M.split_theory_tag(tag) is not None and M.split_theory_tag(tag)[1] == M.ANGULAR_UPDATE:
            group = M.split_theory_tag(tag)[0]
            pred = M.theory_tag(group, M.ANGULAR_EQUILIBRIUM)
            layout[f"theory {group}"] = {
                f"{group}: angular update Δ_t (rad), measured vs sqrt(2ηλ/(1+γ))":
                    tags(tag, *([pred] if pred in tag_set else [])),
                f"{group}: intrinsic LR ηλ": tags(M.theory_tag(group, M.INTRINSIC_LR)),
            }
    return layout


def logged_opt_tags(logdir: Path) -> list:
    """Every opt/<group>/<stat> and theory/<group>/<stat> tag that a run under logdir (the arms, per seed too) has
    logged, sorted."""
    found = set()
    for d in sorted(p for p in Path(logdir).rglob("*") if p.is_dir() and not p.name.startswith(".")):
        for path in event_files(d):
            for ev in read_events(path):
                found.update(v.tag for v in ev.summary.value if v.HasField("simple_value")
                             and (M.split_opt_tag(v.tag) is not None or M.split_theory_tag(v.tag) is not None))
    return sorted(found)


def write_layout(logdir: Path, title: str) -> Path:
    """The custom-scalars layout of logdir, with a chart per param-group tag the arms have logged so far."""
    layout = custom_scalars_layout(title, logged_opt_tags(logdir))
    return write_events_atomic(Path(logdir), LAYOUT_FILE, lambda w: w.add_custom_scalars(layout))


def read_layout(logdir: Path):
    """The custom-scalars Layout proto stored in logdir's event files (None if there is none)."""
    from tensorboard.plugins.custom_scalar import layout_pb2, metadata

    for p in event_files(Path(logdir)):
        for ev in read_events(p):
            for v in ev.summary.value:
                if v.tag == metadata.CONFIG_SUMMARY_TAG:
                    layout = layout_pb2.Layout()
                    layout.ParseFromString(v.tensor.string_val[0])
                    return layout
    return None
