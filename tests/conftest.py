"""Shared test fixtures: where the real COCO subset lies, and small helpers."""

from __future__ import annotations

import builtins
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
COCO_MINI = Path(os.environ.get("MABN_D2_COCO_MINI", REPO.parent / "shared" / "data" / "coco_mini"))
# detectron2's builtin datasets read this when detectron2.data is first imported.
os.environ.setdefault("DETECTRON2_DATASETS", str(COCO_MINI))


def require_coco_mini() -> Path:
    """The coco_mini root; skip (fresh clone without ../shared) or fail (CI=true) if absent."""
    if (COCO_MINI / "coco" / "annotations" / "instances_train2017.json").is_file():
        return COCO_MINI
    reason = (
        f"the real COCO subset is not at {COCO_MINI} (expected ../shared/data/coco_mini beside "
        "the repository, or MABN_D2_COCO_MINI)"
    )
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true: {reason}")
    pytest.skip(reason)


@pytest.fixture
def coco_mini() -> Path:
    return require_coco_mini()


# Functions the whole process shares. A test replaces code under test through that code's
# own seams (an argument, its module's own attribute), never one of these: a replaced
# subprocess.run also served matplotlib's font-cache build, which broke a cold-cache run.
_PROCESS_WIDE = {
    f"{module.__name__}.{name}": (module, name)
    for module, names in (
        (subprocess, ("run", "Popen", "call", "check_call", "check_output")),
        (os, ("system", "cpu_count", "getcwd", "chdir")),
        (time, ("time", "perf_counter", "monotonic", "sleep", "process_time")),
        (sys, ("exit",)),
        (builtins, ("open", "print")),
        (shutil, ("which", "rmtree")),
        (torch, ("set_num_threads", "get_num_threads")),
    )
    for name in names
}
_ORIGINALS = {key: getattr(module, name) for key, (module, name) in _PROCESS_WIDE.items()}


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    """Fail a test that replaced a process-wide function (even one monkeypatch would undo)."""
    result = yield
    replaced = [key for key, (module, name) in _PROCESS_WIDE.items()
                if getattr(module, name) is not _ORIGINALS[key]]
    if replaced:
        raise AssertionError(
            f"{item.nodeid} replaced process-wide function(s) {', '.join(replaced)}: inject a "
            "stand-in into the code under test instead"
        )
    return result
