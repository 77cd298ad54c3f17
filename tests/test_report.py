"""bigexp report: the table and plots from the event files of a real 2-arm compare (shared with test_compare.py),
checked against values read independently (TensorBoard's own record loader, not bigexp.analysis.events' reader)."""
import statistics
from pathlib import Path

import pytest

from test_compare import run_small_compare  # one compare run per session, whichever test file asks first

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def logdir(tmp_path_factory):
    return run_small_compare(tmp_path_factory)


def _raw(run_dir: Path):
    """[(tag, step, value, wall_time)] for every scalar record in run_dir's event files."""
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto.event_pb2 import Event

    out = []
    for p in sorted(run_dir.iterdir()):
        if p.is_file() and "tfevents" in p.name:
            for raw in RawEventFileLoader(str(p)).Load():
                ev = Event.FromString(raw)
                for v in ev.summary.value:
                    if v.HasField("simple_value"):
                        out.append((v.tag, ev.step, v.simple_value, ev.wall_time))
    return out


def _expected(run_dir: Path) -> dict:
    recs = [r for r in _raw(run_dir) if not r[0].startswith("hparam/")]
    by_tag: dict = {}
    for tag, step, val, _ in recs:
        by_tag.setdefault(tag, {})[step] = val
    last = lambda t: by_tag[t][max(by_tag[t])]  # noqa: E731
    walls = [w for *_, w in recs]
    return {"final_top1": last("val/top1"), "best_top1": max(by_tag["val/top1"].values()),
            "final_top5": last("val/top5"), "final_val_loss": last("val/loss"),
            "final_train_loss": last("train/loss"), "wall_time_s": max(walls) - min(walls),
            "median_img_per_s": statistics.median(by_tag["train/img_per_s"].values()),
            "steps": max(step for _, step, _, _ in recs)}


@pytest.mark.slow
def test_report_table_matches_event_files(logdir):
    from bigexp.analysis.report import build_report

    res = build_report(logdir)
    assert [s.name for s in res.summaries] == ["sgd", "expsgd"]  # baseline first
    assert res.baseline.name == "sgd"
    for s in res.summaries:
        exp = _expected(logdir / s.name)
        assert s.arm == s.name
        for key, want in exp.items():
            assert getattr(s, key) == pytest.approx(want, rel=1e-6), (s.name, key)
        assert s.max_invariant_weight_norm is not None and s.max_invariant_weight_norm > 0
    text = (logdir / "report.md").read_text()
    assert text == res.text
    sgd, exp = res.summaries
    # The rows print the same numbers (2 decimals for top-1, 4 for losses).
    assert f"| sgd | sgd | {sgd.final_top1:.2f} | {sgd.best_top1:.2f} |" in text
    assert f"{exp.final_train_loss:.4f}" in text
    # Differences: expsgd minus sgd.
    assert "## Differences (run minus sgd)" in text
    d = exp.final_val_loss - sgd.final_val_loss
    assert f"| expsgd | {exp.final_top1 - sgd.final_top1:+.2f} |" in text and f"{d:+.4f}" in text
    # The gap section reads the gap run: exactly 0 at the first probe (step 0).
    assert "## Equivalence gap" in text and "| first probe | 0 (step 0) |" in text
    assert res.gap["gap/max_abs_logit"][0][0] == 0


@pytest.mark.slow
def test_report_plots_are_pngs(logdir):
    from bigexp.analysis.report import build_report

    res = build_report(logdir)
    names = {p.name for p in res.plots}
    assert {"val_top1.png", "train_loss.png", "lr.png", "effective_lr.png", "weight_norm.png", "gap.png"} <= names
    for p in res.plots:
        assert p.parent == logdir / "plots" and p.read_bytes()[:8] == PNG and p.stat().st_size > 5000
        assert f"](plots/{p.name})" in res.text
    # plot_run (train.py's end-of-run hook) made each arm's own plots.
    for arm in ("sgd", "expsgd"):
        assert (logdir / arm / "plots" / "val_top1.png").read_bytes()[:8] == PNG


def test_unfinished_run_shows_dashes(tmp_path, capsys):
    """A run that has logged training scalars but no validation yet: its top-1 cells are '—'."""
    from bigexp.cli import main
    from bigexp.run.metrics import TBLogger

    for arm, with_val in (("sgd", True), ("expsgd", False)):
        t = TBLogger(tmp_path / arm)
        for s in range(1, 6):
            t.scalars(s, {"train/loss": 2.0 / s, "train/img_per_s": 100.0 + s,
                          "opt/scale_invariant/applied_lr": 0.1, "opt/scale_invariant/weight_norm": 3.0})
        if with_val:
            t.scalars(5, {"val/top1": 42.5, "val/top5": 90.0, "val/loss": 1.25})
        t.close()
    assert main(["report", str(tmp_path), "--no-plots"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| expsgd |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2:7] == ["—"] * 5       # top-1/top-5 final and best, val loss
    assert cells[7] == "0.4000"          # final train loss: 2/5
    assert "| sgd | — | 42.50 |" in out   # no config.yaml: arm unknown, named by directory
    diff = next(line for line in out.splitlines() if line.startswith("| expsgd | —"))
    assert diff  # the difference of a missing value is missing, not 0
    assert (tmp_path / "report.md").is_file() and not (tmp_path / "plots").exists()


def test_single_run_dir_and_errors(tmp_path, capsys):
    from bigexp.cli import main
    from bigexp.run.metrics import TBLogger

    t = TBLogger(tmp_path / "one")
    t.scalars(1, {"train/loss": 1.0})
    t.scalars(1, {"val/top1": 10.0})
    t.close()
    assert main(["report", str(tmp_path / "one"), "--no-plots"]) == 0
    assert "| one | — | 10.00 |" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "missing")]) == 2
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "no TensorBoard event files" in capsys.readouterr().err


def test_resumed_run_keeps_the_later_value(tmp_path):
    """A resumed run logs the steps after its last checkpoint twice; the later write wins."""
    import time

    from bigexp.analysis.events import load_scalars
    from bigexp.run.metrics import TBLogger

    t = TBLogger(tmp_path)
    for s in (1, 2, 3):
        t.scalars(s, {"train/loss": float(s)})
    t.close()
    time.sleep(0.01)
    t = TBLogger(tmp_path)
    for s in (2, 3, 4):
        t.scalars(s, {"train/loss": 10.0 * s})
    t.close()
    steps, values = load_scalars(tmp_path)["train/loss"]
    assert steps == [1, 2, 3, 4] and values == [1.0, 20.0, 30.0, 40.0]


def test_corrupt_event_file_is_bad_input_naming_it(tmp_path, capsys):
    """A record failing its CRC exits 2 naming the file; an incomplete LAST record is a run still writing its
    events: read up to it."""
    from bigexp.analysis.events import load_scalars
    from bigexp.cli import main
    from bigexp.run.metrics import TBLogger

    t = TBLogger(tmp_path / "sgd")
    for s in (1, 2, 3):
        t.scalars(s, {"train/loss": float(s)})
    t.close()
    (events,) = [p for p in (tmp_path / "sgd").iterdir() if "tfevents" in p.name]
    data = events.read_bytes()
    events.write_bytes(data[:-5])
    assert load_scalars(tmp_path / "sgd")["train/loss"] == ([1, 2], [1.0, 2.0])
    bad = bytearray(data)
    bad[len(bad) // 2] ^= 0xFF
    events.write_bytes(bytes(bad))
    assert main(["report", str(tmp_path), "--no-plots"]) == 2
    err = capsys.readouterr().err
    assert f"bigexp report: {events}: corrupt event file" in err
    assert not (tmp_path / "report.md").exists()
