"""Helpers of the tests, in one place: where the repository, its configs and the real COCO
subset lie, and small models, comparisons and runners shared by several test files. (Larger
support modules live beside the tests that use them: tests/layer/mabn_reference.py,
tests/kernels/kernel_formulas.py, tests/kernels/device_checks.py. No test module imports
another test module.)"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import io
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
COCO_MINI = Path(os.environ.get("MABN_D2_COCO_MINI", REPO.parent / "shared" / "data" / "coco_mini"))
# The tiny Mask R-CNN of the end-to-end runs: YAML and LazyConfig.
TINY = CONFIGS / "tiny" / "mask_rcnn_R_18_FPN_tiny_mabn_coco.yaml"
TINY_LAZY = CONFIGS / "lazy" / "tiny" / "mask_rcnn_R_18_FPN_tiny_mabn_coco.py"
# For a child Python: the repository, the tests' helpers and support modules, as pytest's own
# path gives them here.
TEST_PATHS = [REPO, REPO / "tests", REPO / "tests" / "kernels", REPO / "tests" / "layer"]
# Upstream detectron2 main at the commit tools/install_detectron2.py pins (../shared/vendor).
DETECTRON2_TARBALL = REPO.parent / "shared" / "vendor" / "detectron2-02b5c4e2.tar.gz"


# Values of CI that mean "not in CI" (CI systems set CI=true, CI=1, CI=yes, ...).
_NOT_CI = ("", "0", "false", "no", "off")


@functools.cache
def import_script(relative_path: str) -> ModuleType:
    """A script of tools/, dev/ or studies/ (``"tools/predict.py"``) as a module, loaded once per
    session under its file name. The scripts are not packages and not on the tests' path: a
    test names the file it exercises."""
    path = REPO / relative_path
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module  # dataclasses and pickle look a class's module up by name
    spec.loader.exec_module(module)
    return module


def running_in_ci() -> bool:
    """Whether the environment variable ``CI`` is set to a true value (anything but empty,
    ``0``, ``false``, ``no``, ``off``, in any case)."""
    return os.environ.get("CI", "").strip().lower() not in _NOT_CI


def _require_shared(path: Path, reason: str) -> Path:
    """``path`` if it exists; else skip (a user's clone without ../shared) or, in CI, fail."""
    if path.exists():
        return path
    if running_in_ci():
        pytest.fail(f"CI={os.environ['CI']}: {reason}")
    pytest.skip(reason)


def require_coco_mini() -> Path:
    """The coco_mini root; skip (fresh clone without ../shared) or, in CI, fail if absent."""
    _require_shared(
        COCO_MINI / "coco" / "annotations" / "instances_train2017.json",
        f"the real COCO subset is not at {COCO_MINI} (expected ../shared/data/coco_mini beside "
        "the repository, or MABN_D2_COCO_MINI)")
    return COCO_MINI


def require_vendored_detectron2() -> Path:
    """The tarball of upstream detectron2 at the tested commit (../shared/vendor); skip or, in
    CI, fail if absent."""
    return _require_shared(DETECTRON2_TARBALL, f"the upstream detectron2 sources are not at "
                           f"{DETECTRON2_TARBALL} (../shared/vendor beside the repository)")


def small_backbone_cfg(norm: str, **mabn):
    """A ResNet-18 backbone (``build_backbone``), 4 stages, ``norm`` in every block."""
    from detectron2.config import get_cfg  # not at import: conftest sets the data paths first

    from mabn_d2 import add_mabn_config

    cfg = add_mabn_config(get_cfg())
    cfg.merge_from_list(["MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
                         "MODEL.RESNETS.NORM", norm, "MODEL.BACKBONE.FREEZE_AT", "0",
                         "MODEL.RESNETS.OUT_FEATURES", "['res2', 'res3', 'res4', 'res5']"])
    for key, value in mabn.items():
        setattr(cfg.MODEL.MABN, key, value)
    return cfg


def relative_error(got: torch.Tensor, want: torch.Tensor, groups_dim: int | None = None) -> float:
    """Relative L2 error of ``got`` against ``want`` (computed in float64 on the CPU); with
    ``groups_dim``, the worst over the groups along that dimension (channels of an activation,
    rows of a buffer)."""
    got, want = got.detach().cpu().double(), want.detach().cpu().double()
    if groups_dim is None:
        got, want = got.reshape(1, -1), want.reshape(1, -1)
    else:
        got = got.movedim(groups_dim, 0).reshape(got.shape[groups_dim], -1)
        want = want.movedim(groups_dim, 0).reshape(want.shape[groups_dim], -1)
    errors = (got - want).norm(dim=1) / want.norm(dim=1).clamp_min(1e-300)
    return float(errors.max())


class SmallNet(nn.Module):
    """Every kind of conv + MABN pairing fuse_mabn meets, and one it cannot fold."""

    def __init__(self) -> None:
        from detectron2.layers import Conv2d  # not at import: conftest sets the data paths first

        from mabn_d2 import CentralizedConv2d, MABN2d

        super().__init__()
        self.centralized = CentralizedConv2d(3, 8, 3, padding=1, bias=False, norm=MABN2d(8),
                                             activation=nn.ReLU())
        self.with_bias = Conv2d(8, 8, 3, padding=1, bias=True, norm=MABN2d(8))
        self.grouped = CentralizedConv2d(8, 8, 3, padding=1, groups=4, bias=False,
                                         norm=MABN2d(8), activation=nn.ReLU())
        self.plain_conv = nn.Sequential(nn.Conv2d(8, 4, 1), MABN2d(4))  # not foldable

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.plain_conv(self.grouped(self.with_bias(self.centralized(x))))


def set_bn_statistics(model: nn.Module, batches: list[list[dict]]) -> None:
    """Give every BatchNorm the cumulative statistics of ``batches`` (training forward with
    ``momentum=None``), as a converged BN model has."""
    total_loss = import_script("studies/finetune_start_study.py").total_loss

    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    with torch.no_grad():
        for batch in batches:
            total_loss(model, batch)
    for bn in bns:
        bn.momentum = 0.1


def mabn_state(checkpoint: Path, prefix: str = "backbone.bottom_up."
               ) -> dict[str, dict[str, torch.Tensor]]:
    """``{layer: {buffer: tensor}}`` of the MABN layers under ``prefix`` in a checkpoint (by
    default the backbone's, which see every training step; RoI-head norms skip steps without
    RoIs)."""
    model = torch.load(checkpoint, map_location="cpu", weights_only=False)["model"]
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in model.items():
        layer, _, buffer = key.rpartition(".")
        if key.startswith(prefix) and buffer in (
            "running_second_moment", "chi2_buffer", "psi_buffer", "num_batches_tracked"
        ):
            layers.setdefault(layer, {})[buffer] = value
    return layers


def run_tool(*args: str) -> tuple[int, str]:
    """``tools/convert_checkpoint.py ARGS`` in this process: (exit code, stdout + stderr)."""
    tool = import_script("tools/convert_checkpoint.py")

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = tool.main(list(args))
    return code, out.getvalue()


def run_python(code: str, paths: Sequence[Path] = (), **env: str) -> subprocess.CompletedProcess:
    """``code`` in a child Python with ``paths`` before the caller's ``PYTHONPATH``."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=REPO,
        env=subprocess_env(*paths, **env), capture_output=True, text=True, timeout=300,
    )


def sigkill_when(proc: subprocess.Popen, ready: Callable[[], bool], timeout: float,
                 what: str) -> None:
    """``kill -9`` ``proc`` as soon as ``ready()``; fail if it ends first or ``timeout`` passes
    (``what`` names the awaited moment in the failure). The process is killed in any case."""
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            assert proc.poll() is None, f"the run ended before {what}"
            assert time.monotonic() < deadline, f"no {what} after {timeout} s"
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def subprocess_env(*paths: str | os.PathLike, **variables: str) -> dict[str, str]:
    """This process's environment for a child Python, with ``variables`` set and ``paths`` put
    before the caller's own ``PYTHONPATH`` (kept: packages installed with ``pip --target``,
    as on the GPU machine, are found only through it)."""
    python_path = [str(p) for p in paths]
    if os.environ.get("PYTHONPATH"):
        python_path.append(os.environ["PYTHONPATH"])
    env = {**os.environ, **variables}
    if python_path:
        env["PYTHONPATH"] = os.pathsep.join(python_path)
    return env


@functools.lru_cache(maxsize=1)
def triton_interpreter_problem() -> str | None:
    """Why Triton's CPU interpreter (``TRITON_INTERPRET=1``) cannot run a kernel with a loop
    bound given at run time in this environment, or None if it can (or Triton is absent).

    Triton 3.6's interpreter turns a scalar into a Python int with ``int()`` of a one-element
    array, which numpy 2.5 refuses; Triton 3.8's does not. Probed with a tiny kernel, in this
    process, with ``TRITON_INTERPRET`` set only while it is defined and run.
    """
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        @triton.jit
        def count(out_ptr, n):
            total = 0
            for _ in range(0, n):
                total += 1
            tl.store(out_ptr, total)

        out = torch.zeros(1, dtype=torch.int32)
        count[(1,)](out, 3)
        if int(out) != 3:
            return f"Triton {triton.__version__}'s interpreter counted {int(out)}, not 3"
    except Exception as e:  # the interpreter's own failure, whatever its type
        import numpy

        return (f"Triton {triton.__version__}'s interpreter cannot run a loop with a run-time "
                f"bound under numpy {numpy.__version__}: {type(e).__name__}: {e}")
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous
    return None


def record_pid_and_sleep(folder: str) -> None:
    """A launched worker (tests/e2e/test_launch_worker_lifetime.py): write
    ``worker_<rank>.pid`` into ``folder``, then wait to be ended."""
    from detectron2.utils import comm

    (Path(folder) / f"worker_{comm.get_rank()}.pid").write_text(str(os.getpid()))
    try:
        time.sleep(600)
    except KeyboardInterrupt:
        # torch's spawn asks for SIGINT when the launcher dies; a trainer then runs its
        # after_train hooks (a final evaluation, ...) and goes on as an orphan.
        time.sleep(600)


def training_env(coco_mini: Path) -> dict[str, str]:
    """The environment of a training subprocess on the COCO subset, one thread."""
    return {**os.environ, "DETECTRON2_DATASETS": str(coco_mini), "OMP_NUM_THREADS": "1"}


def read_losses(path: Path) -> dict[int, float]:
    """``{iteration: total_loss}`` of the JSON lines tests/e2e/resume_worker.py writes."""
    import json

    return {e["iteration"]: e["total_loss"]
            for e in map(json.loads, path.read_text().splitlines())}


def run_training(cmd: list[str], coco_mini: Path, timeout: float = 600) -> str:
    """Run a training command to its end and return its output (stdout + stderr); fail the
    test with the output's tail if it fails."""
    proc = subprocess.run(cmd, env=training_env(coco_mini), cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    return output
