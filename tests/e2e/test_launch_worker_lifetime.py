"""Workers die with their launcher: SIGKILL of the process that launched a 2-process run
leaves no orphan worker training (and holding OUTPUT_DIR's lock)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from helpers import REPO, subprocess_env

LAUNCHER = """
import sys
from mabn_d2.engine.launch import launch
from helpers import record_pid_and_sleep
launch(record_pid_and_sleep, 2, backend="gloo", args=(sys.argv[1],))
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead: its parent (init) has not reaped it yet
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_killing_the_launcher_ends_its_workers(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(tmp_path)], cwd=REPO,
                            env=subprocess_env(REPO / "tests", OMP_NUM_THREADS="1"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while len(list(tmp_path.glob("worker_*.pid"))) < 2:
            assert proc.poll() is None, "the launcher ended before its workers started"
            assert time.monotonic() < deadline, "the workers did not start"
            time.sleep(0.2)
        pids = [int(p.read_text()) for p in tmp_path.glob("worker_*.pid")]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 30
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        alive = [pid for pid in pids if _alive(pid)]
        assert not alive, f"orphan workers still running: {alive}"
    finally:
        for pid in [int(p.read_text()) for p in tmp_path.glob("worker_*.pid")]:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
