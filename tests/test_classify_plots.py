"""The run's figures say what happened: log loss axis, the run's name, no restored-epoch mark without
validation data."""

from __future__ import annotations

import pytest

pytest.importorskip("matplotlib")

from lstmkit.classify._plots import learning_curve_figure  # noqa: E402


def _history(n: int, val: bool) -> dict:
    loss = [2.0 * 0.8**i for i in range(n)]
    return {
        "epoch": list(range(1, n + 1)),
        "loss": loss,
        "acc": [min(1.0, 0.3 + 0.02 * i) for i in range(n)],
        "val_loss": [v * 1.1 for v in loss] if val else [None] * n,
        "val_acc": [0.5] * n if val else [None] * n,
        "lr": [1e-3] * n,
        "seconds": [0.1] * n,
        "best_epoch": n - 3 if val else n,
    }


def _legend(ax) -> list[str]:
    return [t.get_text() for t in ax.get_legend().get_texts()]


def test_without_validation_nothing_is_marked_restored():
    fig = learning_curve_figure(_history(60, val=False), title="JapaneseVowels-20250101-000000: JapaneseVowels")
    ax_loss, ax_acc = fig.axes
    for ax in (ax_loss, ax_acc):
        assert not any("restored" in t or "best" in t for t in _legend(ax)), _legend(ax)
        assert not ax.lines[1:]  # the training curve only
    assert ax_loss.get_yscale() == "log"
    assert fig._suptitle.get_text().startswith("JapaneseVowels-20250101-000000")


def test_with_validation_the_restored_epoch_is_marked():
    fig = learning_curve_figure(_history(30, val=True))
    ax_loss, _ = fig.axes
    assert "best validation (epoch 27, restored)" in _legend(ax_loss)
    assert ax_loss.get_yscale() == "log"
    assert ax_loss.get_ylim()[0] < 2.0 * 0.8**29  # the late epochs are visible, not flattened onto zero


def test_the_run_writes_its_name_into_the_figures(tmp_path, monkeypatch):
    import lstmkit.classify._plots as plots
    from lstmkit.classify import write_csv
    from lstmkit.cli import main
    from test_classify_helpers import make_sequences

    titles = {}
    real_curve, real_cm = plots.learning_curve, plots.confusion_matrix_plot
    monkeypatch.setattr(plots, "learning_curve", lambda h, p, title="": (titles.setdefault("curve", title),
                                                                         real_curve(h, p, title))[1])
    monkeypatch.setattr(plots, "confusion_matrix_plot", lambda cm, lab, p, title="": (
        titles.setdefault("cm", title), real_cm(cm, lab, p, title))[1])
    X, y = make_sequences(24, seed=0)
    write_csv(tmp_path / "d.csv", X, y)
    out = tmp_path / "my-run"
    assert main(["train", "--data", str(tmp_path / "d.csv"), "--out", str(out), "--epochs", "1", "--hidden-size",
                 "4", "--backend", "reference", "--no-progress"]) == 0
    assert titles["curve"].startswith("my-run: ") and titles["cm"].startswith("my-run: test accuracy ")
