"""Curves of one or more runs into one PNG: train/val loss, tokens/s and learning rate against tokens seen.

    python plot.py OUT_DIR [OUT_DIR ...] [--out curves.png] [--title TEXT]

Each run keeps one colour across panels; train loss is a solid line, val loss dashed with markers. The x axis
is tokens, not steps, so runs with different batch sizes line up.
"""
import argparse
import json
import os
import sys


def read_metrics(out_dir: str) -> list[dict]:
    """The rows of OUT_DIR/metrics.jsonl (train rows carry `loss`, eval rows `val_loss`)."""
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def series(rows: list[dict], key: str) -> tuple[list, list]:
    picked = [r for r in rows if r.get(key) is not None]
    return [r["tokens"] for r in picked], [r[key] for r in picked]


def plot(runs: dict[str, list[dict]], path: str, title: str | None = None):
    """Draw {label: rows} into a PNG at `path`; returns the matplotlib Figure."""
    import matplotlib
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    fig, (ax_loss, ax_speed, ax_lr) = plt.subplots(1, 3, figsize=(13, 3.8), width_ratios=[2, 1, 1])
    for i, (label, rows) in enumerate(runs.items()):
        color = f"C{i}"
        ax_loss.plot(*series(rows, "loss"), color=color, lw=1.2, label=f"{label} train")
        ax_loss.plot(*series(rows, "val_loss"), color=color, ls="--", marker="o", ms=3, label=f"{label} val")
        ax_speed.plot(*series(rows, "tokens_per_s"), color=color, lw=1.2, label=label)
        ax_lr.plot(*series(rows, "lr"), color=color, lw=1.2, label=label)
    for ax, ylabel in ((ax_loss, "loss (nats/token)"), (ax_speed, "tokens/s"), (ax_lr, "learning rate")):
        ax.set_xlabel("tokens")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    ax_loss.legend(fontsize=8)
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)  # out of pyplot's registry; the returned figure keeps its data
    return fig


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dirs", nargs="+", help="run folders holding metrics.jsonl")
    p.add_argument("--out", default="curves.png", help="PNG to write")
    p.add_argument("--title", default=None)
    args = p.parse_args(argv)
    import importlib.util
    if importlib.util.find_spec("matplotlib") is None:
        print('error: plot.py needs matplotlib: pip install ".[tracking]"', file=sys.stderr)
        return 2
    runs = {}
    for d in args.out_dirs:
        label = os.path.basename(os.path.normpath(d))
        if label in runs:  # two runs with the same folder name: tell them apart by path
            label = os.path.normpath(d)
        try:
            runs[label] = read_metrics(d)
        except (OSError, json.JSONDecodeError) as e:
            print(f"error: {d}: cannot read metrics.jsonl ({e})", file=sys.stderr)
            return 2
    plot(runs, args.out, args.title)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
