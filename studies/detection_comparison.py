#!/usr/bin/env python
"""Detection comparison on the demo data: BN, GN, MABN and MABN without weight centralization,
at the demo's schedule and at multiples of it, over several seeds; box and mask AP.

Each run is ``tools/train_net.py`` on the demo config (Mask R-CNN R-18-FPN, norm in backbone,
FPN and ROI heads) with the norm, schedule and seed overridden on the command line; its
``eval_results.json`` gives the AP. Finished runs are skipped, so an interrupted comparison
resumes. Writes ``<out>/detection_comparison.json`` and ``.png`` and prints a table::

    python studies/detection_comparison.py                      # 4 norms x 2 schedules x 3 seeds
    python studies/detection_comparison.py --norms GN MABN --schedules 1 --seeds 1
    python studies/detection_comparison.py --dry-run            # print the commands only
    python studies/detection_comparison.py --jobs 2             # two runs at a time, 1 thread each
    python studies/detection_comparison.py --no-train           # table of the runs finished so far
    python studies/detection_comparison.py --seeds 5 --reuse earlier/detection_comparison.json \
        configs/demo/expected_results.json                    # earlier runs count as finished
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "demo" / "mask_rcnn_R_18_FPN_demo_mabn.yaml"
NORM_KEYS = ("MODEL.RESNETS.NORM", "MODEL.FPN.NORM", "MODEL.ROI_BOX_HEAD.NORM",
             "MODEL.ROI_MASK_HEAD.NORM")
# name -> (norm, extra opts)
SETTINGS: dict[str, tuple[str, list[str]]] = {
    "BN": ("BN", []),
    "GN": ("GN", []),
    "MABN": ("MABN", []),
    "MABN w/o centralization": ("MABN", ["MODEL.MABN.CENTRALIZE_WEIGHTS", "False"]),
}


def base_schedule(config: Path) -> tuple[int, tuple[int, ...]]:
    """``(SOLVER.MAX_ITER, SOLVER.STEPS)`` of ``config``."""
    from mabn_d2.engine import get_mabn_cfg

    cfg = get_mabn_cfg()
    cfg.merge_from_file(str(config))
    return cfg.SOLVER.MAX_ITER, tuple(cfg.SOLVER.STEPS)


def run_dir(out: Path, setting: str, schedule: int, seed: int) -> Path:
    slug = setting.lower().replace("/", "").replace(" ", "_")
    return out / f"{slug}_x{schedule}_seed{seed}"


def train_command(config: Path, setting: str, schedule: int, seed: int, out_dir: Path,
                  base: tuple[int, tuple[int, ...]]) -> list[str]:
    """The ``train_net.py`` command of one run: the schedule ``schedule`` times ``base``."""
    norm, extra = SETTINGS[setting]
    max_iter, steps = base
    opts = [
        "OUTPUT_DIR", str(out_dir),
        "SEED", str(seed),
        "SOLVER.MAX_ITER", str(max_iter * schedule),
        "SOLVER.STEPS", str(tuple(s * schedule for s in steps)),
        "SOLVER.CHECKPOINT_PERIOD", str(max_iter * schedule),
    ]
    for key in NORM_KEYS:
        opts += [key, norm]
    return [sys.executable, str(REPO / "tools" / "train_net.py"), "--config-file", str(config),
            *opts, *extra]


def read_ap(out_dir: Path) -> dict[str, float] | None:
    """``{"box_AP", "mask_AP"}`` of a finished run, or None."""
    path = out_dir / "eval_results.json"
    if not path.is_file():
        return None
    results = json.loads(path.read_text())
    dataset = next(iter(results.values()))
    return {"box_AP": dataset["bbox"]["AP"], "mask_AP": dataset["segm"]["AP"]}


def repo_relative(path: Path) -> str:
    """``path`` relative to the repository when inside it: a recorded config that names the
    same file in every clone."""
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def reused_runs(paths: Sequence[Path], config: Path, max_iter: int) -> dict[tuple, dict]:
    """Finished runs recorded in earlier outputs, by ``(setting, schedule, seed)``: this
    script's ``detection_comparison.json`` or the demo's ``expected_results.json`` (its runs
    are MABN at schedule 1: ``make demo`` trains the demo config as this script's MABN row
    does). A file made from another config or base schedule is an error."""
    found: dict[tuple, dict] = {}
    for path in paths:
        record = json.loads(path.read_text())
        recorded = Path(record.get("config", ""))
        recorded = recorded if recorded.is_absolute() else REPO / recorded
        if recorded.resolve() != config.resolve():
            raise ValueError(f"--reuse {path}: made from {record.get('config')!r}, not "
                             f"{config}; reuse only runs of the same config")
        demo_record = "base_max_iter" not in record
        if not demo_record and record["base_max_iter"] != max_iter:
            raise ValueError(f"--reuse {path}: base schedule {record['base_max_iter']} "
                             f"iterations, not {max_iter}")
        for run in record["runs"]:
            setting, schedule = ("MABN", 1) if demo_record else (run["setting"], run["schedule"])
            if run["box_AP"] is not None:
                found[(setting, schedule, run["seed"])] = {
                    "setting": setting, "schedule": schedule, "seed": run["seed"],
                    "box_AP": run["box_AP"], "mask_AP": run["mask_AP"], "reused_from": str(path)}
    return found


def summarize(runs: Sequence[dict]) -> list[dict]:
    rows = []
    for setting in SETTINGS:
        for schedule in sorted({r["schedule"] for r in runs}):
            done = [r for r in runs if r["setting"] == setting and r["schedule"] == schedule
                    and r["box_AP"] is not None]
            if not done:
                continue
            row = {"setting": setting, "schedule": schedule, "seeds": len(done)}
            for key in ("box_AP", "mask_AP"):
                values = [r[key] for r in done]
                row[key] = statistics.fmean(values)
                row[key + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
                row[key + "_values"] = values
            rows.append(row)
    return rows


def format_table(rows: Sequence[dict], max_iter: int) -> str:
    lines = ["| norm | iterations | box AP | mask AP | seeds |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(
            f"| {r['setting']} | {max_iter * r['schedule']} | {r['box_AP']:.1f} ± "
            f"{r['box_AP_std']:.1f} | {r['mask_AP']:.1f} ± {r['mask_AP_std']:.1f} | "
            f"{r['seeds']} |"
        )
    return "\n".join(lines)


def plot(rows: Sequence[dict], max_iter: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5), sharey=True)
    schedules = sorted({r["schedule"] for r in rows})
    width = 0.8 / max(len(schedules), 1)
    for ax, key in zip(axes, ("box_AP", "mask_AP")):
        for k, schedule in enumerate(schedules):
            sel = [r for r in rows if r["schedule"] == schedule]
            pos = [list(SETTINGS).index(r["setting"]) + k * width for r in sel]
            ax.bar(pos, [r[key] for r in sel], width, yerr=[r[key + "_std"] for r in sel],
                   capsize=3, label=f"{max_iter * schedule} iterations")
            for x, r in zip(pos, sel):  # every seed, so the spread behind the bar shows
                ax.plot([x] * len(r[key + "_values"]), r[key + "_values"], "k.", ms=4)
        ax.set_xticks([i + width * (len(schedules) - 1) / 2 for i in range(len(SETTINGS))],
                      list(SETTINGS), fontsize=8)
        ax.set_title(key.replace("_", " "))
    axes[0].set_ylabel("AP (bars: mean ± std; dots: seeds)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Sequence[str] | None = None, *,
         run: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> list[dict]:
    """Train what is missing, summarize, write the JSON and the figure; the rows.

    ``run`` starts each training process (``subprocess.run``'s signature and result), so a
    caller can inject its own runner without touching the process-wide ``subprocess``.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--norms", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--schedules", nargs="+", type=int, default=[1, 2],
                        help="multiples of the demo's schedule (default: 1 2)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--config-file", type=Path, default=DEMO_CONFIG)
    parser.add_argument("--out", type=Path, default=Path("output/detection_comparison"))
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs trained at the same time (default 1)")
    parser.add_argument("--no-train", action="store_true",
                        help="summarize the finished runs only (train nothing)")
    parser.add_argument("--reuse", nargs="+", type=Path, default=[],
                        help="earlier results whose runs count as finished: this script's "
                             "detection_comparison.json or configs/demo/expected_results.json")
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.jobs < 1 or any(s < 1 for s in args.schedules):
        parser.error("--seeds, --jobs and --schedules must be >= 1")
    base = base_schedule(args.config_file)
    reused = reused_runs(args.reuse, args.config_file, base[0])
    planned = [(setting, schedule, seed) for schedule in args.schedules
               for seed in range(args.seeds) for setting in args.norms]
    if args.dry_run:
        for setting, schedule, seed in planned:
            if (setting, schedule, seed) in reused:
                continue
            out_dir = run_dir(args.out, setting, schedule, seed)
            print(" ".join(train_command(args.config_file, setting, schedule, seed, out_dir, base)))
        return []
    # Each run gets OMP_NUM_THREADS threads (1 unless set): runs in parallel on one CPU
    # stall each other when they also use several threads each.
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}

    def train(setting: str, schedule: int, seed: int) -> dict:
        if (setting, schedule, seed) in reused:
            return reused[(setting, schedule, seed)]
        out_dir = run_dir(args.out, setting, schedule, seed)
        if read_ap(out_dir) is None and not args.no_train:
            out_dir.mkdir(parents=True, exist_ok=True)
            print(f"training {setting}, x{schedule}, seed {seed} -> {out_dir}", flush=True)
            cmd = train_command(args.config_file, setting, schedule, seed, out_dir, base)
            with open(out_dir / "train_net.log", "w") as log:
                done = run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
            if done.returncode != 0:
                raise RuntimeError(f"{setting}, x{schedule}, seed {seed} failed (exit "
                                   f"{done.returncode}); see {out_dir / 'train_net.log'}")
        ap = read_ap(out_dir) or {"box_AP": None, "mask_AP": None}
        return {"setting": setting, "schedule": schedule, "seed": seed, **ap}

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        runs = list(pool.map(lambda plan: train(*plan), planned))
    rows = summarize(runs)
    table = format_table(rows, base[0])
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "detection_comparison.json").write_text(json.dumps(
        {"config": repo_relative(args.config_file), "base_max_iter": base[0], "summary": rows,
         "runs": runs}, indent=1))
    plot(rows, base[0], args.out / "detection_comparison.png")
    return rows


if __name__ == "__main__":
    main()
