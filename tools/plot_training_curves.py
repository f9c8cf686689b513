#!/usr/bin/env python
"""Plot the training losses and the learning rate of a detectron2 run from its metrics.json.

    python tools/plot_training_curves.py output/demo/metrics.json  # -> training_curves.png

detectron2's ``JSONWriter`` appends one JSON object per logging period (every 20 iterations by
default) with ``iteration``, ``lr``, ``total_loss`` and every ``loss_*`` term (medians over the
period), and one per evaluation with the AP metrics only; the plot draws the former: the losses
on a log scale above, the learning rate below.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from mabn_d2.cli import UserError, run_tool, strip_debug_flag
from mabn_d2.validation import check_output_dir

__all__ = ["read_metrics", "plot_curves", "main"]


def read_metrics(path: Path) -> list[dict]:
    """The training records of ``metrics.json`` (those with a ``total_loss``), by iteration;
    a line cut short by a kill (the last one) is skipped, any other bad line is an error."""
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if number == len(lines):  # the run was killed while writing it
                continue
            raise ValueError(f"{path}:{number}: not a JSON object ({e})") from None
        if "total_loss" in record and "iteration" in record:
            records.append(record)
    if not records:
        raise ValueError(f"{path}: no training records (no line with iteration and total_loss)")
    return sorted(records, key=lambda r: r["iteration"])


def plot_curves(records: Sequence[dict], out: Path, title: str = "") -> None:
    """Losses (every ``*loss*`` key, log scale) and ``lr`` against iterations, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    iterations = [r["iteration"] for r in records]
    keys = sorted({k for r in records for k in r if "loss" in k},
                  key=lambda k: (k != "total_loss", k))
    fig, (losses, lr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True,
                                     gridspec_kw={"height_ratios": [3, 1]})
    for key in keys:
        points = [(r["iteration"], r[key]) for r in records if key in r and r[key] > 0]
        if points:
            xs, ys = zip(*points)
            losses.plot(xs, ys, label=key, linewidth=2.0 if key == "total_loss" else 1.0)
    losses.set_yscale("log")
    losses.set_ylabel("loss (median over the logging period)")
    losses.legend(fontsize=8, ncol=2)
    losses.grid(True, which="both", alpha=0.3)
    if title:
        losses.set_title(title, fontsize=10)
    lr.plot(iterations, [r.get("lr", float("nan")) for r in records], color="black")
    lr.set_ylabel("learning rate")
    lr.set_xlabel("iteration")
    lr.grid(True, alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)


_DEFAULT_NAME = "training_curves.png"


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; a user error is one message and exit code 2 (``--debug`` or
    ``MABN_D2_DEBUG=1``: with the traceback)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    return run_tool("plot_training_curves.py", lambda: _run(strip_debug_flag(argv)), argv)


def _run(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("metrics", type=Path, help="a run's OUTPUT_DIR/metrics.json")
    parser.add_argument("--out", help="PNG to write, or a folder (an existing one, or a path "
                        "ending in /) to write training_curves.png into (default: beside "
                        "metrics.json)")
    args = parser.parse_args(argv)
    if not args.metrics.is_file():
        raise UserError(f"{args.metrics} is not a file (give a run's OUTPUT_DIR/metrics.json)")
    out = args.metrics.with_name(_DEFAULT_NAME)
    if args.out:
        is_folder = args.out.endswith(("/", os.sep)) or Path(args.out).is_dir()
        out = Path(args.out) / _DEFAULT_NAME if is_folder else Path(args.out)
    check_output_dir(str(out.parent), "--out")
    try:
        records = read_metrics(args.metrics)
    except ValueError as e:
        raise UserError(str(e)) from None
    plot_curves(records, out, title=str(args.metrics.parent))
    print(f"plot_training_curves: {len(records)} records -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
