"""plot.py draws each run's train/val loss, tokens/s and lr against tokens into a PNG."""
import os
import shutil

import pytest

import plot
from conftest import run

pytest.importorskip("matplotlib")


def test_plot_compares_runs(trained, tmp_path):
    other = str(tmp_path / "other")
    os.makedirs(other)
    shutil.copy(os.path.join(trained, "metrics.jsonl"), other)
    png = str(tmp_path / "curves.png")
    r = run("plot.py", trained, other, "--out", png, "--title", "tiny")
    assert "wrote" in r.stdout
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"

    rows = plot.read_metrics(trained)
    fig = plot.plot({"a": rows, "b": rows}, str(tmp_path / "again.png"))
    loss_ax, speed_ax, lr_ax = fig.axes
    train_line, val_line = loss_ax.lines[:2]
    assert list(train_line.get_xdata()) == [r["tokens"] for r in rows if "loss" in r]
    assert list(train_line.get_ydata()) == [r["loss"] for r in rows if "loss" in r]
    assert list(val_line.get_ydata()) == [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(loss_ax.lines) == 4 and len(speed_ax.lines) == 2 and len(lr_ax.lines) == 2
    assert list(lr_ax.lines[1].get_ydata()) == [r["lr"] for r in rows if "lr" in r]


def test_plot_reports_a_missing_run(tmp_path):
    r = run("plot.py", str(tmp_path / "nothing"), "--out", str(tmp_path / "x.png"), check=False)
    assert r.returncode == 2 and "metrics.jsonl" in r.stderr
