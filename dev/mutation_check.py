#!/usr/bin/env python
"""Mutation check: do the tests catch deliberate bugs?

Each mutation of ``dev/mutations.toml`` replaces one exact snippet of one file with a
bug. The check copies the repository (working tree, without .git, .venv, outputs and caches)
to a temporary directory, runs the tests of every selected mutation once unmutated (they must
pass: otherwise a "caught" would mean nothing), then, one mutation at a time, applies it to
the copy, runs its tests with ``pytest -x`` against the copy (``PYTHONPATH`` = the copy, so
its ``mabn_d2`` is imported; C++ kernels built into a temporary extension directory), puts
the file back, and reports whether the tests failed (caught) or passed (survived).

Not part of the test suite (it runs the tests dozens of times: tens of minutes on two
cores); run it after changing the package or the tests, e.g.::

    python dev/mutation_check.py --list
    python dev/mutation_check.py                      # every mutation
    python dev/mutation_check.py --only py-no-finite-guard --only cpp-axpby-sign
    python dev/mutation_check.py --fast                 # with the fast tier's tests only
    nohup python dev/mutation_check.py --json output/mutations.json > mutations.log &

A snippet that is not in its file exactly once stops the check before anything runs, naming
the mutation (repair its anchor in dev/mutations.toml). Exit status: 0 when every mutation
is caught, 1 when one survives or its tests cannot run, 2 for a bad mutation list, 3 when the
unmutated tests fail.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MUTATIONS_FILE = REPO / "dev" / "mutations.toml"
# Not copied: version control, environments, outputs and caches.
_SKIP = {".git", ".venv", "output", "build", "datasets", "__pycache__", ".pytest_cache",
         ".ruff_cache"}
_FIELDS = ("id", "area", "bug", "file", "find", "replace", "tests")


@dataclass(frozen=True)
class Mutation:
    id: str
    area: str
    bug: str
    file: str
    find: str
    replace: str
    tests: tuple[str, ...]


@dataclass
class Result:
    id: str
    area: str
    outcome: str  # "caught", "survived", "timeout" or "error"
    seconds: float
    detail: str  # the first failing test, or why the tests could not run


class MutationListError(ValueError):
    """The mutation list cannot be applied to this repository as it is."""


def load_mutations(path: Path = MUTATIONS_FILE) -> list[Mutation]:
    """The mutations of ``path``, with ``@alias`` test selections expanded."""
    import tomllib  # Python >= 3.11 (ruff's target version does not know it as stdlib)

    data = tomllib.loads(path.read_text())
    aliases = data.get("aliases", {})
    mutations, problems = [], []
    for i, entry in enumerate(data.get("mutation", [])):
        missing = [f for f in _FIELDS if f not in entry]
        unknown = sorted(set(entry) - set(_FIELDS))
        if missing or unknown:
            problems.append(f"mutation #{i + 1} ({entry.get('id', '?')}): missing {missing}, "
                            f"unknown {unknown}")
            continue
        tests = []
        for test in entry["tests"]:
            if test.startswith("@") and test[1:] not in aliases:
                problems.append(f"{entry['id']}: unknown test alias {test}")
            tests.append(aliases.get(test[1:], test) if test.startswith("@") else test)
        mutations.append(Mutation(**{**entry, "tests": tuple(tests)}))
    ids = [m.id for m in mutations]
    problems += [f"duplicate id {i}" for i in sorted({i for i in ids if ids.count(i) > 1})]
    if problems:
        raise MutationListError("\n".join(problems))
    return mutations


def check_anchors(mutations: list[Mutation], root: Path) -> None:
    """Every snippet occurs exactly once in its file, and every test file exists; raises
    :class:`MutationListError` listing every problem."""
    problems = []
    for m in mutations:
        path = root / m.file
        if not path.is_file():
            problems.append(f"{m.id}: {m.file} does not exist")
            continue
        count = path.read_text().count(m.find)
        if count != 1:
            where = "not found" if count == 0 else f"found {count} times"
            problems.append(f"{m.id}: snippet {where} in {m.file}:\n    {m.find!r}")
        if m.find == m.replace:
            problems.append(f"{m.id}: replace equals find")
        for test in m.tests:
            if not (root / test.split("::")[0]).is_file():
                problems.append(f"{m.id}: test file {test.split('::')[0]} does not exist")
    if problems:
        raise MutationListError("\n".join(problems))


def copy_repository(destination: Path) -> Path:
    def ignore(_: str, names: list[str]) -> set[str]:
        return {n for n in names if n in _SKIP or n.endswith(".egg-info")}

    shutil.copytree(REPO, destination, ignore=ignore)
    return destination


def test_environment(copy: Path, extensions: Path) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(copy), "OMP_NUM_THREADS": "1",
           "TORCH_EXTENSIONS_DIR": str(extensions)}
    # The tests find the real COCO subset beside the repository; the copy has nothing beside it.
    coco_mini = Path(os.environ.get("MABN_D2_COCO_MINI", REPO.parent / "shared" / "data"
                                    / "coco_mini"))
    if coco_mini.is_dir():
        env["MABN_D2_COCO_MINI"] = str(coco_mini.resolve())
    return env


# pytest's selection of the fast tier (make test-fast): no end-to-end test, no CUDA tier.
FAST_TIER = "not e2e and not cuda"


def run_tests(tests: tuple[str, ...], copy: Path, env: dict[str, str], timeout: float,
              marker: str | None = None) -> tuple[str, str]:
    """``(outcome, detail)`` of ``pytest -x`` on ``tests`` in ``copy`` (only those ``marker``
    selects, if given): "passed", "failed", "timeout", "untested" (the selection left no test)
    or "error" (pytest could not run them: collection or usage errors)."""
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-rf",
               *(["-m", marker] if marker else []), *tests]
    try:
        proc = subprocess.run(command, cwd=copy, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", f"no result within {timeout:.0f} s"
    output = proc.stdout + proc.stderr
    if proc.returncode == 0:
        return "passed", output.strip().splitlines()[-1] if output.strip() else ""
    if proc.returncode == 1:
        failed = [line for line in output.splitlines() if line.startswith("FAILED ")]
        return "failed", failed[0][len("FAILED "):] if failed else "tests failed"
    if proc.returncode == 5:
        return "untested", f"no test selected ({marker})"
    return "error", f"pytest exit status {proc.returncode}: " + output[-2000:]


def check(mutations: list[Mutation], timeout: float, baseline: bool,
          report=print, marker: str | None = None) -> list[Result]:
    """Runs the check in a temporary copy; ``report`` receives one line per event. With
    ``marker``, each mutation's tests are only those the marker expression selects (a
    mutation left without a test is "untested": not caught)."""
    with tempfile.TemporaryDirectory(prefix="mabn_d2_mutations_") as tmp:
        copy = copy_repository(Path(tmp) / "repo")
        env = test_environment(copy, Path(tmp) / "torch_extensions")
        if baseline:
            every_test = tuple(dict.fromkeys(t for m in mutations for t in m.tests))
            start = time.monotonic()
            outcome, detail = run_tests(every_test, copy, env, timeout * len(every_test),
                                        marker)
            report(f"baseline (unmutated): {outcome} in {time.monotonic() - start:.0f} s; "
                   f"{detail}")
            if outcome != "passed":
                raise RuntimeError(f"the unmutated tests do not pass ({outcome}): {detail}")
        results = []
        for m in mutations:
            path = copy / m.file
            original = path.read_text()
            path.write_text(original.replace(m.find, m.replace, 1))
            start = time.monotonic()
            try:
                outcome, detail = run_tests(m.tests, copy, env, timeout, marker)
            finally:
                path.write_text(original)
            outcome = {"failed": "caught", "passed": "survived"}.get(outcome, outcome)
            result = Result(m.id, m.area, outcome, time.monotonic() - start, detail)
            results.append(result)
            report(f"{m.id:<46} {m.area:<26} {outcome.upper():<9} {result.seconds:6.0f} s  "
                   f"{detail.splitlines()[0] if detail else ''}")
        return results


def summary(results: list[Result]) -> str:
    counts = {o: sum(r.outcome == o for r in results) for o in
              ("caught", "timeout", "survived", "untested", "error")}
    line = (f"{len(results)} mutations: {counts['caught']} caught, {counts['timeout']} timed "
            f"out, {counts['survived']} survived, {counts['untested']} without a selected "
            f"test, {counts['error']} could not run")
    survivors = [r.id for r in results if r.outcome in ("survived", "untested", "error")]
    return line + (f"\nnot caught: {', '.join(survivors)}" if survivors else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--only", action="append", metavar="ID", default=[],
                        help="run only this mutation (repeatable)")
    parser.add_argument("--timeout", type=float, default=1500,
                        help="seconds for one mutation's tests (default 1500); a timeout "
                             "counts as caught, reported apart")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the run of the unmutated tests")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--fast", action="store_true",
                        help=f"run only each mutation's tests of the fast tier (pytest -m "
                             f"'{FAST_TIER}', what make test-fast runs)")
    args = parser.parse_args(argv)
    try:
        mutations = load_mutations()
        unknown = sorted(set(args.only) - {m.id for m in mutations})
        if unknown:
            raise MutationListError(f"unknown mutation ids {unknown}")
        if args.only:
            mutations = [m for m in mutations if m.id in args.only]
        check_anchors(mutations, REPO)
    except MutationListError as e:
        print(f"mutation_check: bad mutation list {MUTATIONS_FILE}:\n{e}", file=sys.stderr)
        return 2
    if args.list:
        for m in mutations:
            print(f"{m.id:<46} {m.area:<26} {m.file}: {m.bug}")
        return 0
    print(f"{len(mutations)} mutations of {REPO}, tests run with {sys.executable}", flush=True)
    try:
        results = check(mutations, args.timeout, not args.no_baseline,
                        report=lambda line: print(line, flush=True),
                        marker=FAST_TIER if args.fast else None)
    except RuntimeError as e:
        print(f"mutation_check: {e}", file=sys.stderr)
        return 3
    print(summary(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=1))
    return 0 if all(r.outcome in ("caught", "timeout") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
