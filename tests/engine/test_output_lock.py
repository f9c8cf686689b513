"""One run per OUTPUT_DIR: a second holder is refused with the folder and the holder named; the
lock of a process that died (even by ``kill -9``) does not block the next run."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mabn_d2.engine.output_lock import (
    LOCK_FILE,
    OutputDirBusyError,
    OutputDirLock,
    hold_output_dir,
)

from helpers import REPO, sigkill_when

# The module and mabn_d2.cli alone (standard library only), not the package: no detectron2
# import to wait for.
HOLD = """
import importlib.util, os, sys, time, types
for name in ("mabn_d2", "mabn_d2.engine"):
    sys.modules[name] = types.ModuleType(name)
    sys.modules[name].__path__ = []
def load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
load("mabn_d2.cli", os.path.join(os.path.dirname(sys.argv[1]), "..", "cli.py"))
module = load("mabn_d2.engine.output_lock", sys.argv[1])
module.OutputDirLock(sys.argv[2]).acquire()
print("held", flush=True)
time.sleep(600)
"""


def holder(out) -> subprocess.Popen:
    """A process holding the lock of ``out`` until killed (it prints "held" once it does)."""
    module = REPO / "mabn_d2" / "engine" / "output_lock.py"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(module), str(out)], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_holder_is_refused_until_the_first_is_killed(tmp_path):
    proc = holder(tmp_path)
    try:
        with pytest.raises(OutputDirBusyError) as info:
            OutputDirLock(str(tmp_path)).acquire()
    finally:
        sigkill_when(proc, lambda: True, 10, "the kill")  # kill -9: no clean-up ran
    message = str(info.value)  # names the folder and the holder
    assert f"OUTPUT_DIR {tmp_path} is in use by another run (pid {proc.pid} on " in message
    assert "OUTPUT_DIR output/another_run" in message
    # The lock of the killed process does not block the next run.
    assert (tmp_path / LOCK_FILE).exists()  # the file stays, the lock went with the process
    with OutputDirLock(str(tmp_path)) as lock:
        assert lock.held
    with OutputDirLock(str(tmp_path)):  # released by the first
        pass


def test_within_a_process_two_locks_conflict_but_hold_is_idempotent(tmp_path):
    with OutputDirLock(str(tmp_path)):
        with pytest.raises(OutputDirBusyError):
            OutputDirLock(str(tmp_path)).acquire()
    out = tmp_path / "run"
    assert hold_output_dir(str(out)) is hold_output_dir(str(out) + "/")
    with pytest.raises(OutputDirBusyError):
        OutputDirLock(str(out)).acquire()
