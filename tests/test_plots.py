"""bigexp.analysis.plots (and report.plot_run, its one-run use): PNGs from real event files (TBLogger), log axes
with zeros, atomic writes."""
import pytest

PNG = b"\x89PNG\r\n\x1a\n"


def _run(d, arm_lr_growth=1.0, steps=20):
    from bigexp.run.metrics import TBLogger

    t = TBLogger(d)
    for s in range(1, steps + 1):
        t.scalars(s, {"train/loss": 2.0 / s, "opt/scale_invariant/applied_lr": 0.1 * arm_lr_growth ** s,
                      "opt/scale_invariant/effective_lr": 0.01, "opt/scale_invariant/weight_norm": 5.0 + s,
                      "opt/plain/applied_lr": 0.1, "opt/plain/weight_norm": 1.0})
    t.scalars(steps, {"val/top1": 50.0, "val/loss": 1.0})
    t.close()


def test_plot_run_writes_each_curve(tmp_path):
    from bigexp.analysis.report import plot_run

    _run(tmp_path / "r")
    paths = plot_run(tmp_path / "r")
    assert {p.name for p in paths} == {"val_top1.png", "train_loss.png", "lr.png", "effective_lr.png",
                                       "weight_norm.png"}
    for p in paths:
        assert p.parent == tmp_path / "r" / "plots" and p.read_bytes()[:8] == PNG
    assert not list((tmp_path / "r" / "plots").glob(".*"))  # no temp files left behind
    # Rewriting replaces in place.
    assert {p.name for p in plot_run(tmp_path / "r")} == {p.name for p in paths}


def test_plot_run_on_empty_dir(tmp_path):
    from bigexp.analysis.report import plot_run

    assert plot_run(tmp_path) == []
    assert not (tmp_path / "plots").exists()


def test_plot_compare_lines_and_gap_with_zeros(tmp_path):
    import matplotlib

    from bigexp.analysis.plots import plot_compare, plot_curves
    from bigexp.analysis.events import load_scalars

    _run(tmp_path / "sgd")
    _run(tmp_path / "expsgd", arm_lr_growth=1.3)
    runs = {a: load_scalars(tmp_path / a) for a in ("sgd", "expsgd")}
    gap = {"gap/max_abs_logit": ([0, 10, 20], [0.0, 1e-6, 1e-3]), "gap/kl": ([0, 10, 20], [0.0, 0.0, 1e-9]),
           "gap/top1_agreement": ([0, 10, 20], [1.0, 1.0, 0.98])}
    paths = plot_compare(runs, tmp_path / "out", gap=gap)
    assert "gap.png" in {p.name for p in paths}
    assert matplotlib.get_backend().lower() == "agg"
    # One line per run and param group; nothing matched -> no file.
    assert plot_curves(runs, tmp_path / "none.png", title="t", ylabel="y", pattern=r"^nope$") is None
    assert not (tmp_path / "none.png").exists()


def test_lines_are_labelled_per_run_and_group(tmp_path, monkeypatch):
    import bigexp.analysis.plots as plots
    from bigexp.analysis.events import load_scalars

    _run(tmp_path / "sgd")
    _run(tmp_path / "expsgd", arm_lr_growth=1.3)
    runs = {a: load_scalars(tmp_path / a) for a in ("sgd", "expsgd")}
    seen = {}

    def capture(fig, path):
        ax = fig.axes[0]
        seen[path.name] = ({line.get_label(): list(line.get_ydata()) for line in ax.get_lines()}, ax.get_yscale())
        return path

    monkeypatch.setattr(plots, "save_figure_atomic", capture)
    plots.plot_compare(runs, tmp_path / "out")
    labels, scale = seen["lr.png"]
    assert scale == "log"
    assert set(labels) == {"sgd: plain", "sgd: scale_invariant", "expsgd: plain", "expsgd: scale_invariant"}
    assert labels["expsgd: scale_invariant"][-1] == pytest.approx(0.1 * 1.3 ** 20, rel=1e-6)
    labels, scale = seen["train_loss.png"]
    assert scale == "linear" and {"sgd: train", "sgd: val"} <= set(labels)


def test_theory_figure_per_invariant_group_only_when_logged(tmp_path):
    """theory.png: a panel per invariant group that logged theory/<group>/angular_update, none without."""
    from bigexp.analysis.plots import plot_theory
    from bigexp.analysis.report import plot_run
    from bigexp.run.metrics import TBLogger

    t = TBLogger(tmp_path / "r")
    for s in range(1, 11):
        t.scalars(s, {"train/loss": 1.0, "theory/scale_invariant/a/angular_update": 0.01 / s,
                      "theory/scale_invariant/a/angular_equilibrium": 0.005,
                      "theory/scale_invariant/b/angular_update": 0.0,   # exact 0 (a skipped step): on the floor
                      "theory/scale_invariant/b/angular_equilibrium": 0.005})
    t.close()
    assert "theory.png" in {p.name for p in plot_run(tmp_path / "r")}
    assert (tmp_path / "r" / "plots" / "theory.png").read_bytes()[:8] == PNG
    assert plot_theory({"sgd": [{"train/loss": ([1], [1.0])}]}, tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()
