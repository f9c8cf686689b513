#!/usr/bin/env python3
"""The GPU check: one prepared command for a GPU machine without network (``make gpu-check``).

It installs the wheelhouse that ``make gpu-wheelhouse`` filled on a machine with network
(``pip install --no-index --no-deps --target SITE``), then runs each part in a process of its
own -- every part runs even if an earlier one failed, each under a time limit cut to what is
left of the total budget (8 minutes by default) -- and writes the report into ``--out``:

* ``report.json`` / ``report.md`` -- per part: passed / failed / timeout / not run, seconds,
  why; the CUDA tier's tests one by one; the benchmark's numbers and targets; the environment;
* ``cuda_tier.xml`` -- pytest's JUnit XML of the CUDA tier;
* ``parts.log`` -- everything every part printed.

Parts (``--parts`` chooses; default: all but ``cpu_tests``):

* ``install`` -- the wheelhouse into ``--site`` (skipped without ``--wheelhouse``);
* ``environment`` -- versions, the GPU, ``import mabn_d2, detectron2``, a model-zoo config,
  the Triton kernels' self-check verdicts;
* ``cuda_tier`` -- ``pytest -m cuda tests/kernels/test_device_checks.py`` (a skipped test fails the
  part unless ``--no-cuda``: on a GPU machine, nothing may be skipped);
* ``benchmark_layer``, ``benchmark_model`` -- ``studies/benchmark.py --device cuda``: layers in
  float32 and AMP at the four detection shapes, Mask R-CNN R50-FPN training (2 images of
  800x1333) and eager inference, with the targets;
* ``cpu_kernels`` -- the C++ CPU kernels built with this torch and tested;
* ``cpu_tests`` -- the CPU layer tests (the rehearsal on a CPU machine, ``--no-cuda``).

Only the standard library is used here: this script runs before anything is installed.

Examples::

    python3 dev/gpu_check.py --wheelhouse output/gpu_wheelhouse --out output/gpu_check
    python3 dev/gpu_check.py --parts cuda_tier,benchmark_layer --out /tmp/r  # a second try
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BUDGET_S = 480
DEFAULT_PARTS = ("install", "environment", "cuda_tier", "benchmark_layer", "benchmark_model",
                 "cpu_kernels")
ALL_PARTS = (*DEFAULT_PARTS, "cpu_tests")
# Parts started with less than this left of the budget are not run.
MIN_PART_S = 20
PER_TEST_TIMEOUT_S = 150
# The model zoo config whose presence shows detectron2's configs were installed with it.
ZOO_CONFIG = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml"
# The CPU layer tests of the rehearsal.
CPU_TESTS = ["tests/kernels/test_kernels.py", "tests/layer/test_mabn_reference.py",
             "tests/kernels/test_device_checks.py"]

ENVIRONMENT_PROBE = f"""
import json, os, platform, sys
info = {{"python": platform.python_version(), "executable": sys.executable}}
import numpy, PIL, torch
info.update(numpy=numpy.__version__, pillow=PIL.__version__, torch=torch.__version__,
            torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
try:
    import triton
    info["triton"] = triton.__version__
except ImportError as e:
    info["triton"] = f"not importable: {{e}}"
print("ENVIRONMENT " + json.dumps(info), flush=True)  # what is known if an import below fails
import detectron2
from detectron2 import model_zoo
import mabn_d2
from mabn_d2 import kernels
info.update(detectron2=detectron2.__version__, detectron2_path=os.path.dirname(
    detectron2.__file__), mabn_d2_path=os.path.dirname(mabn_d2.__file__))
config = model_zoo.get_config_file("{ZOO_CONFIG}")
assert os.path.isfile(config), config
info["model_zoo_config"] = config
if torch.cuda.is_available():
    info["gpu"] = torch.cuda.get_device_name(0)
    info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    info["cudnn"] = torch.backends.cudnn.version()
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        kernels.backend_for(torch.zeros(2, 3, 4, 5, device="cuda", dtype=dtype))
    info["triton_self_check"] = kernels.self_check_results()
print("ENVIRONMENT " + json.dumps(info))
"""


@dataclass
class Part:
    name: str
    command: list[str]
    timeout_s: float
    result: dict = field(default_factory=dict)
    output: str = ""


def pip_install_command(wheelhouse: Path, site: Path) -> list[str]:
    wheels = sorted(str(p) for p in wheelhouse.glob("*.whl"))
    return [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
            "--no-compile", "--no-cache-dir", "--upgrade", "--target", str(site), *wheels]


def pytest_command(*args: str) -> list[str]:
    command = [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", *args]
    if importlib.util.find_spec("pytest_timeout") is not None:
        # Where pytest-timeout is installed (the GPU machine has it), a hung test fails alone
        # instead of taking the whole part's time and the other tests' results with it.
        command.append(f"--timeout={PER_TEST_TIMEOUT_S}")
    return command


def benchmark_command(only: str, json_path: Path, quick: bool) -> list[str]:
    command = [sys.executable, "studies/benchmark.py", "--device", "cuda", "--only", only,
               "--json", str(json_path)]
    if only == "layer":
        command += ["--amp"] + (["--repeats", "3"] if quick else ["--repeats", "10"])
    else:
        command += ["--image-size", "800", "--image-width", "1333", "--no-deployed",
                    "--model-repeats", "2" if quick else "5"]
    return command


def build_parts(args: argparse.Namespace, scratch: Path) -> list[Part]:
    quick = args.quick
    parts = {
        "install": Part("install", pip_install_command(args.wheelhouse, args.site)
                        if args.wheelhouse else [], 120),
        "environment": Part("environment", [sys.executable, "-c", ENVIRONMENT_PROBE], 120),
        "cuda_tier": Part("cuda_tier", pytest_command(
            "-m", "cuda", "tests/kernels/test_device_checks.py",
            f"--junitxml={args.out / 'cuda_tier.xml'}"), 300),
        "benchmark_layer": Part("benchmark_layer", benchmark_command(
            "layer", scratch / "benchmark_layer.json", quick), 150),
        "benchmark_model": Part("benchmark_model", benchmark_command(
            "model", scratch / "benchmark_model.json", quick), 180),
        "cpu_kernels": Part("cpu_kernels", pytest_command(
            "tests/kernels/test_kernels.py", "-k",
            "cpp_kernels_build_here or fused_step_matches"), 240),
        "cpu_tests": Part("cpu_tests", pytest_command("-m", "not cuda", *CPU_TESTS), 1800),
    }
    return [parts[name] for name in args.parts]


def child_environment(site: Path | None) -> dict[str, str]:
    """The parts' environment: the installed wheels and this repository on the path, no
    package index, unbuffered output, NCCL on loopback unless set."""
    paths = [str(site)] if site else []
    paths.append(str(REPO))
    if os.environ.get("PYTHONPATH"):
        paths.append(os.environ["PYTHONPATH"])
    # NCCL_SOCKET_IFNAME: the one-process NCCL group bootstraps over loopback (the machine
    # may have no other interface up).
    return {"NCCL_SOCKET_IFNAME": "lo", **os.environ, "PYTHONPATH": os.pathsep.join(paths),
            "PIP_NO_INDEX": "1", "PYTHONUNBUFFERED": "1"}


def run_part(part: Part, env: dict[str, str], log, deadline: float) -> None:
    """Run ``part`` within its limit and the budget; fill ``part.result``."""
    left = deadline - time.monotonic()
    if not part.command:
        part.result = {"status": "not run", "seconds": 0.0, "why": "nothing to do (no "
                       "--wheelhouse)"}
        return
    if left < MIN_PART_S:
        part.result = {"status": "not run", "seconds": 0.0,
                       "why": f"budget spent ({left:.0f} s left)"}
        return
    limit = min(part.timeout_s, left)
    print(f"[gpu_check] {part.name}: starting (limit {limit:.0f} s)", flush=True)
    log.write(f"\n===== {part.name}: {' '.join(part.command)}\n")
    log.flush()
    start = time.monotonic()
    try:
        proc = subprocess.run(part.command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=limit, check=False)
        output, status = proc.stdout, "passed" if proc.returncode == 0 else "failed"
        returncode: int | None = proc.returncode
    except subprocess.TimeoutExpired as e:
        output = e.stdout if isinstance(e.stdout, str) else (e.stdout or b"").decode(
            errors="replace")
        status, returncode = "timeout", None
    seconds = time.monotonic() - start
    part.output = output
    log.write(output)
    log.write(f"\n===== {part.name}: {status} in {seconds:.1f} s\n")
    log.flush()
    lines = [line for line in output.splitlines() if line.strip()]
    part.result = {"status": status, "seconds": round(seconds, 1), "returncode": returncode,
                   "tail": lines[-15:]}
    print(f"[gpu_check] {part.name}: {status} in {seconds:.1f} s", flush=True)


def environment_of(part: Part) -> dict:
    """The last ``ENVIRONMENT {json}`` line the environment part printed."""
    for line in reversed(part.output.splitlines()):
        if line.startswith("ENVIRONMENT "):
            return json.loads(line[len("ENVIRONMENT "):])
    return {}


def junit_tests(path: Path) -> list[dict]:
    """One row per test of a JUnit XML file: name, outcome, seconds, message."""
    if not path.is_file():
        return []
    rows = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            child = case.find(tag)
            if child is not None:
                outcome = "failed" if tag == "failure" else tag
                message = (child.get("message") or child.text or "")[:500]
                break
        rows.append({"name": f"{case.get('classname', '')}::{case.get('name', '')}",
                     "outcome": outcome, "seconds": float(case.get("time") or 0.0),
                     "message": message})
    return rows


def judge_cuda_tier(part: Part, tests: list[dict], cuda_expected: bool) -> None:
    """A skipped CUDA test fails the part where a GPU is expected; none collected fails it."""
    counts: dict[str, int] = {}
    for t in tests:
        counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
    part.result["counts"] = counts
    if part.result.get("status") != "passed":
        return
    if not tests:
        part.result.update(status="failed", why="no test collected")
    elif cuda_expected and counts.get("skipped"):
        reason = next(t["message"] for t in tests if t["outcome"] == "skipped")
        part.result.update(status="failed", why=f"{counts['skipped']} test(s) skipped on a "
                           f"GPU machine: {reason}")
    elif not cuda_expected and counts.get("skipped") == len(tests):
        part.result["why"] = "no CUDA here: every test collected and skipped, as expected"


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def markdown_report(report: dict, benchmark_markdown: list[str]) -> str:
    env = report["environment"]
    lines = [f"# GPU check, {report['started']}", "",
             f"{env.get('gpu', 'no GPU')}; Python {env.get('python', '?')}, torch "
             f"{env.get('torch', '?')} (CUDA {env.get('torch_cuda')}), triton "
             f"{env.get('triton', '?')}, numpy {env.get('numpy', '?')}, detectron2 "
             f"{env.get('detectron2', '?')}. Wall time {report['wall_s']:.0f} s of a "
             f"{report['budget_s']} s budget.", "",
             "| part | status | seconds | why |", "| --- | --- | ---: | --- |"]
    for p in report["parts"]:
        why = p.get("why") or ("" if p["status"] == "passed" else
                               " / ".join(p.get("tail", [])[-2:]))
        lines.append(f"| {p['name']} | {p['status']} | {p['seconds']} | "
                     f"{why.replace('|', '/')[:300]} |")
    tests = report.get("cuda_tier", [])
    if tests:
        lines += ["", "## CUDA tier", "", "| test | outcome | seconds | message |",
                  "| --- | --- | ---: | --- |"]
        for t in sorted(tests, key=lambda t: t["outcome"] == "passed"):
            message = t["message"].splitlines()[0][:200] if t["message"] else ""
            lines.append(f"| {t['name']} | {t['outcome']} | {t['seconds']:.1f} | "
                         f"{message.replace('|', '/')} |")
    for text in benchmark_markdown:
        lines += ["", "## Benchmark", "", text]
    if env.get("triton_self_check") is not None:
        lines += ["", f"Triton self-check: `{json.dumps(env['triton_self_check'])}`"]
    return "\n".join(lines) + "\n"


def _budget_seconds(text: str) -> float:
    """``--budget-s``: a finite number of seconds >= 0 (0: every part reported as not run;
    argparse names the option, exit 2).
    This script runs on a bare GPU machine before mabn_d2 is installed: no package import."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheelhouse", type=Path, help="folder of wheels to install first")
    parser.add_argument("--site", type=Path, default=Path(tempfile.gettempdir()) / "mabn_site",
                        help="where the wheels go (pip --target); on the parts' PYTHONPATH")
    parser.add_argument("--out", type=Path, default=REPO / "output" / "gpu_check",
                        help="report folder")
    parser.add_argument("--parts", default=",".join(DEFAULT_PARTS),
                        help=f"comma-separated, in order; from {', '.join(ALL_PARTS)}")
    parser.add_argument("--budget-s", type=_budget_seconds, default=DEFAULT_BUDGET_S,
                        help="total wall time for all parts")
    parser.add_argument("--quick", action="store_true", help="fewer benchmark repeats")
    parser.add_argument("--no-cuda", action="store_true",
                        help="CPU rehearsal: the CUDA tier is expected to be skipped")
    args = parser.parse_args(argv)
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in args.parts if p not in ALL_PARTS]
    if unknown:
        parser.error(f"--parts: unknown {unknown}; choose from {', '.join(ALL_PARTS)}")
    if args.wheelhouse and not sorted(args.wheelhouse.glob("*.whl")):
        parser.error(f"--wheelhouse {args.wheelhouse}: no .whl files there (make "
                     "gpu-wheelhouse fills it on a machine with network)")
    args.out.mkdir(parents=True, exist_ok=True)
    start_wall, start = datetime.datetime.now().astimezone(), time.monotonic()
    deadline = start + args.budget_s
    site = args.site if args.wheelhouse else None
    env = child_environment(site)
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as scratch_dir, \
            open(args.out / "parts.log", "w") as log:
        scratch = Path(scratch_dir)
        parts = build_parts(args, scratch)
        for part in parts:
            run_part(part, env, log, deadline)
        benchmark = {name: read_json(scratch / f"{name}.json")
                     for name in ("benchmark_layer", "benchmark_model")}
        benchmark_markdown = [(scratch / f"{name}.md").read_text() for name in benchmark
                              if (scratch / f"{name}.md").is_file()]
    by_name = {p.name: p for p in parts}
    tests = junit_tests(args.out / "cuda_tier.xml") if "cuda_tier" in by_name else []
    if "cuda_tier" in by_name:
        judge_cuda_tier(by_name["cuda_tier"], tests, cuda_expected=not args.no_cuda)
    report = {
        "started": start_wall.isoformat(timespec="seconds"),
        "wall_s": round(time.monotonic() - start, 1),
        "budget_s": args.budget_s,
        "host": platform.node(),
        "command": [sys.executable, *sys.argv],
        "environment": environment_of(by_name["environment"]) if "environment" in by_name
        else {},
        "parts": [{"name": p.name, **p.result} for p in parts],
        "cuda_tier": tests,
        "benchmark": {k: v for k, v in benchmark.items() if v is not None},
    }
    (args.out / "report.json").write_text(json.dumps(report, indent=2))
    (args.out / "report.md").write_text(markdown_report(report, benchmark_markdown))
    failed = [p.name for p in parts if p.result["status"] not in ("passed", "not run")
              or (p.name != "install" and p.result["status"] == "not run")]
    print(f"[gpu_check] report: {args.out / 'report.md'}; "
          + (f"FAILED: {', '.join(failed)}" if failed else "all parts passed"), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
