#!/usr/bin/env python
"""Draw the batch statistics that mabn_d2's batch-statistics recorder wrote, as curves.

The recorder is :class:`mabn_d2.integration.batch_stats.BatchStatsHook`.

Each ``--run LABEL=PATH`` is one training run's detectron2 ``metrics.json`` (one JSON object
per line) or the JSON written by ``studies/small_batch_study.py`` (its ``batch_stats`` entry, one
curve per recorded method). One panel per statistic (``mu_B``, ``sigma^2_B``, ``g_B``,
``Psi_B``), one curve per run, e.g. BN with batch 2 against BN with batch 32 and MABN::

    python studies/plot_batch_stats.py --run "BN/32=output/bn32/metrics.json" \\
        --run "BN/2=output/bn2/metrics.json" --run "MABN/2=output/mabn2/metrics.json" \\
        --layer backbone.bottom_up.res2.0.conv1.norm --out batch_stats.png
    python studies/plot_batch_stats.py --study docs/results/small_batch_study.json --out x.png
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

STATS = {"mu": r"$\mu_B$", "var": r"$\sigma^2_B$", "g": r"$g_B$", "psi": r"$\Psi_B$"}
PREFIX = "batch_stats/"

Curves = dict[str, list[tuple[int, float]]]  # stat -> [(iteration, value)]


def read_metrics_json(path: Path, layer: str | None, channel: int) -> tuple[str, Curves]:
    """The curves of ``layer`` (default: the first layer found) from a ``metrics.json``."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    layers = sorted({k[len(PREFIX):].rsplit("/", 2)[0] for row in rows for k in row
                     if k.startswith(PREFIX)})
    if not layers:
        raise ValueError(f"{path}: no '{PREFIX}...' scalars (was BATCH_STATS.PERIOD > 0?)")
    layer = layer or layers[0]
    if layer not in layers:
        raise ValueError(f"{path}: no statistics of layer {layer!r}; recorded: {layers}")
    curves: Curves = {s: [] for s in STATS}
    for row in rows:
        for stat in STATS:
            key = f"{PREFIX}{layer}/{stat}/c{channel}"
            if key in row:
                curves[stat].append((int(row["iteration"]), float(row[key])))
    if not any(curves.values()):
        raise ValueError(f"{path}: layer {layer!r} has no values for channel {channel}")
    return layer, curves


def read_study_json(path: Path) -> tuple[str, dict[str, Curves]]:
    """``(layer, {method: curves})`` from ``studies/small_batch_study.py``'s JSON."""
    data = json.loads(path.read_text())
    if not data.get("batch_stats"):
        raise ValueError(f"{path}: no batch statistics (run the study with --record-every > 0)")
    runs = {
        method: {s: [(r["iteration"], r[s]) for r in rows if s in r] for s in STATS}
        for method, rows in data["batch_stats"].items()
    }
    return data["batch_stats_layer"], runs


def plot(runs: dict[str, Curves], title: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(STATS), figsize=(4 * len(STATS), 3.3))
    for ax, (stat, label) in zip(axes, STATS.items()):
        for name, curves in runs.items():
            points = curves.get(stat, [])
            if points:
                its, values = zip(*points)
                ax.plot(its, values, lw=0.8, label=name)
        ax.set_title(label)
        ax.set_xlabel("iteration")
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)


def parse_run(text: str) -> tuple[str, Path]:
    label, sep, path = text.partition("=")
    if not sep or not label or not path:
        raise argparse.ArgumentTypeError(f"expected LABEL=PATH, got {text!r}")
    return label, Path(path)


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=parse_run, action="append", default=[],
                        metavar="LABEL=METRICS_JSON", help="a run's metrics.json (repeatable)")
    parser.add_argument("--study", type=Path, help="small_batch_study.py's JSON")
    parser.add_argument("--layer", help="layer name (default: the first recorded)")
    parser.add_argument("--channel", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="PNG to write")
    args = parser.parse_args(argv)
    if not args.run and not args.study:
        parser.error("give --run LABEL=PATH (repeatable) and/or --study PATH")
    runs: dict[str, Curves] = {}
    layers = set()
    if args.study:
        layer, study_runs = read_study_json(args.study)
        layers.add(layer)
        runs.update(study_runs)
    for label, path in args.run:
        layer, runs[label] = read_metrics_json(path, args.layer, args.channel)
        layers.add(layer)
    plot(runs, f"batch statistics of {', '.join(sorted(layers))}, channel {args.channel}",
         args.out)
    print(f"wrote {args.out}")
    return args.out


if __name__ == "__main__":
    main()
