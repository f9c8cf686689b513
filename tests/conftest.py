"""Shared test fixtures (helpers live in tests/helpers.py), and the test session's data paths.

The session sets its data paths itself, whatever the caller's environment holds, before any
test module imports detectron2 or mabn_d2 (both read them at import): detectron2's builtin
datasets (``DETECTRON2_DATASETS``) are the real COCO subset, and the demo dataset
(``MABN_D2_DATASETS``, default ``./datasets``) goes to a directory of this session, removed at
its end. Subprocesses started by the tests inherit both.
"""

from __future__ import annotations

import builtins
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from helpers import COCO_MINI, require_coco_mini

SESSION_DATASETS = Path(tempfile.mkdtemp(prefix="mabn_d2_test_datasets_"))
os.environ["DETECTRON2_DATASETS"] = str(COCO_MINI)
os.environ["MABN_D2_DATASETS"] = str(SESSION_DATASETS)


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(SESSION_DATASETS, ignore_errors=True)


E2E_FOLDER = Path(__file__).resolve().parent / "e2e"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test under tests/e2e/ is end to end (marker ``e2e``), as are the tests marked so
    elsewhere; ``make test-fast`` runs the rest."""
    for item in items:
        if E2E_FOLDER in Path(item.fspath).resolve().parents:
            item.add_marker(pytest.mark.e2e)


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
