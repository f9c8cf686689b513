#!/usr/bin/env python
"""The end of ``make demo``: where this run's result falls against what the README expects.

The expected numbers live in one place, ``configs/demo/expected_results.json``: the box and
mask AP and the wall time of ``make demo`` for several seeds, with the thread count, OpenMP
wait policy and stack they were measured on (a run's time is ``null`` where other work shared
the CPU: its AP counts, its time does not; a run's own ``"wait_policy"`` overrides the file's).
A run's time is compared only with timed runs of its thread count and wait policy. The README states
their mean ± std (a test keeps the two the same). This tool reads the run's
``OUTPUT_DIR/eval_results.json`` and prints, for each number, the expected range and where the
run falls::

    python dev/demo_report.py --output-dir output/demo --threads 2 --wait-policy ACTIVE \
        --seconds 372

The report is a list of sections (``SECTIONS``), each a function of the run and the expected
results returning lines; a later step of the demo adds its own section there.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from mabn_d2.cli import float_at_least, int_at_least

REPO = Path(__file__).resolve().parents[1]
EXPECTED_FILE = REPO / "configs" / "demo" / "expected_results.json"
METRICS = {"box_AP": ("bbox", "box AP"), "mask_AP": ("segm", "mask AP")}


@dataclass(frozen=True)
class Run:
    """What ``make demo`` just did."""

    output_dir: Path
    threads: int | None = None
    seconds: float | None = None
    wait_policy: str | None = None
    config_file: str | None = None  # the run's --config-file, as make demo passes it
    overrides: str = ""  # the run's cfg overrides beyond SEED (make demo's DEMO_OPTS)

    def results(self) -> dict[str, float]:
        """``{"box_AP", "mask_AP"}`` of the run's (single) test dataset."""
        path = self.output_dir / "eval_results.json"
        per_dataset = json.loads(path.read_text())
        if len(per_dataset) != 1:
            raise ValueError(f"{path}: expected one dataset, found {sorted(per_dataset)}")
        (dataset,) = per_dataset.values()
        return {key: float(dataset[task]["AP"]) for key, (task, _) in METRICS.items()}

    def seed(self) -> int | None:
        config = self.output_dir / "config.yaml"  # written by detectron2's default_setup
        for line in config.read_text().splitlines() if config.is_file() else []:
            if line.startswith("SEED:"):
                return int(line.split(":", 1)[1])
        return None


def load_expected(path: Path = EXPECTED_FILE) -> dict:
    return json.loads(path.read_text())


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def expected_stats(expected: dict, key: str) -> tuple[float, float]:
    """Mean and std of ``key`` over the expected runs that have it (a run timed while other
    work shared the CPU has ``"seconds": null``: its AP counts, its time does not)."""
    return mean_std([run[key] for run in expected["runs"] if run.get(key) is not None])


def _seed_list(runs: Sequence[dict]) -> str:
    """The runs' seeds, consecutive ones as a range: ``0-9``, ``0-2, 5, 7``."""
    seeds, parts = [run["seed"] for run in runs], []
    start = 0
    for i in range(1, len(seeds) + 1):
        if i == len(seeds) or seeds[i] != seeds[i - 1] + 1:
            first, last = seeds[start], seeds[i - 1]
            parts.append(str(first) if first == last else
                         f"{first}, {last}" if last == first + 1 else f"{first}-{last}")
            start = i
    return ", ".join(parts)


def wait_policy(expected: dict, run: dict) -> str | None:
    """The OpenMP wait policy ``run`` of the expected results ran with."""
    return run.get("wait_policy", expected.get("wait_policy"))


def timed_runs(expected: dict, policy: str | None = None) -> list[dict]:
    """The expected runs timed alone on the machine (with wait policy ``policy`` if given)."""
    return [run for run in expected["runs"] if run.get("seconds") is not None
            and (policy is None or wait_policy(expected, run) == policy)]


def _threads(n: int) -> str:
    return f"{n} thread" + ("" if n == 1 else "s")


def readme_summary(expected: dict) -> str:
    """The sentence the README states (tests/dev/test_demo_report.py keeps them the same)."""
    parts = []
    for key, (_, label) in METRICS.items():
        mean, std = expected_stats(expected, key)
        parts.append(f"{label} {mean:.1f} ± {std:.1f}")
    text = (f"{', '.join(parts)} (mean ± std over seeds {_seed_list(expected['runs'])}; "
            f"{_threads(expected['threads'])})")
    timed = timed_runs(expected)
    if timed:
        mean, std = mean_std([run["seconds"] for run in timed])
        policies = sorted({str(wait_policy(expected, run)).lower() for run in timed})
        text += (f", training + evaluation {_format_seconds(mean)} ± {std:.0f} s (seeds "
                 f"{_seed_list(timed)}, each alone on the machine, {'/'.join(policies)} wait)")
    return text


def _format_seconds(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s"


def placement(value: float, mean: float, std: float) -> str:
    """Where ``value`` falls: within 1 or 2 std of ``mean``, or outside (above/below)."""
    if std == 0:
        return "equal to the expected value" if value == mean else \
            ("above" if value > mean else "below") + " the expected value"
    z = (value - mean) / std
    side = "above" if z > 0 else "below"
    if abs(z) <= 1:
        return f"within the expected range (mean ± 1 std; {z:+.1f} std)"
    if abs(z) <= 2:
        return f"within mean ± 2 std, {side} the mean ({z:+.1f} std)"
    return f"OUTSIDE the expected range: {z:+.1f} std, {side} mean ± 2 std"


def ap_section(run: Run, expected: dict) -> list[str]:
    results = run.results()
    lines = []
    for key, (_, label) in METRICS.items():
        mean, std = expected_stats(expected, key)
        values = [r[key] for r in expected["runs"]]
        lines.append(f"{label} {results[key]:.1f}: expected {mean:.1f} ± {std:.1f} "
                     f"(seeds gave {min(values):.1f}-{max(values):.1f}); "
                     f"{placement(results[key], mean, std)}")
    return lines


def time_section(run: Run, expected: dict) -> list[str]:
    if run.seconds is None or not timed_runs(expected):
        return []
    if run.threads is not None and run.threads != expected["threads"]:
        return [f"time {_format_seconds(run.seconds)} with {_threads(run.threads)}: the "
                f"expected time was measured with {_threads(expected['threads'])}, so it is "
                "not compared"]
    timed = timed_runs(expected, run.wait_policy)
    if not timed:
        measured = sorted({str(wait_policy(expected, r)) for r in timed_runs(expected)})
        return [f"time {_format_seconds(run.seconds)} with OMP_WAIT_POLICY={run.wait_policy}: "
                f"the expected time was measured with {'/'.join(measured)} on an idle machine "
                "(make demo uses PASSIVE when other work holds the cores), so it is not compared"]
    mean, std = mean_std([r["seconds"] for r in timed])
    return [f"time {_format_seconds(run.seconds)}: expected {_format_seconds(mean)} ± "
            f"{std:.0f} s on {expected['machine']} (seeds {_seed_list(timed)}, alone); "
            f"{placement(run.seconds, mean, std)} (time depends on the CPU and its load)"]


def setting_section(run: Run, expected: dict) -> list[str]:
    lines = []
    seed = run.seed()
    lines.append(f"run: SEED {seed}" + ("" if run.threads is None else
                                        f", {_threads(run.threads)}")
                 + ("" if run.wait_policy is None else f", {run.wait_policy.lower()} wait")
                 + f"; expected range: seeds {_seed_list(expected['runs'])}, "
                   f"{_threads(expected['threads'])}, {expected['stack']}"
                 + (f", commit {expected['commit']}" if "commit" in expected else ""))
    if run.threads is not None and run.threads != expected["threads"]:
        lines.append(f"note: the range was measured with {_threads(expected['threads'])}; "
                     "other thread counts round differently (AP moves within the seed spread)")
    return lines


Section = Callable[[Run, dict], list[str]]
SECTIONS: list[Section] = [setting_section, ap_section, time_section]


def same_config(run: Run, expected: dict) -> bool:
    """Whether the run trained the config the expected results were made with (True when
    the run does not say)."""
    if run.config_file is None:
        return True
    return (REPO / run.config_file).resolve() == (REPO / expected["config"]).resolve()


def report(run: Run, expected: dict, sections: Sequence[Section] = SECTIONS) -> list[str]:
    if not same_config(run, expected):
        return [f"run: {run.config_file}, SEED {run.seed()}; the expected range is of "
                f"{expected['config']}: not compared"]
    if run.overrides.strip():
        return [f"run: SEED {run.seed()} with the overrides {run.overrides.strip()!r}; the "
                "expected range is of the config's own settings: not compared"]
    return [line for section in sections for line in section(run, expected)]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", type=Path, default=Path("output/demo"))
    parser.add_argument("--threads", type=int_at_least(1), help="OMP_NUM_THREADS of the run")
    parser.add_argument("--seconds", type=float_at_least(0.0), help="wall time of the run")
    parser.add_argument("--wait-policy", type=str.upper, choices=["ACTIVE", "PASSIVE"],
                        help="OMP_WAIT_POLICY of the run")
    parser.add_argument("--config-file", help="the run's config (relative to the repository)")
    parser.add_argument("--overrides", default="",
                        help="the run's cfg overrides other than SEED (make demo's DEMO_OPTS)")
    parser.add_argument("--expected", type=Path, default=EXPECTED_FILE)
    args = parser.parse_args(argv)
    run = Run(args.output_dir, args.threads, args.seconds, args.wait_policy, args.config_file,
              args.overrides)
    if not (run.output_dir / "eval_results.json").is_file():
        print(f"demo report: no {run.output_dir / 'eval_results.json'}: did the run finish?")
        return 1
    print("=== make demo: this run against the README's expected range")
    for line in report(run, load_expected(args.expected)):
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
