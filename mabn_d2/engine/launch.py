"""Multi-process launch on machines without CUDA (gloo), detectron2-compatible.

detectron2's ``launch`` spawns one process per GPU with NCCL and asserts CUDA. On the CPU
(tests, CI, laptops) :func:`launch` spawns the same workers with the gloo backend and sets up
detectron2's per-machine process group, so ``DefaultTrainer``, ``comm`` and the evaluators
work unchanged. With CUDA available it simply calls detectron2's ``launch``.

In the gloo worker processes only, detectron2's ``create_ddp_model`` (which
``DefaultTrainer`` calls) is wrapped so that a CPU model keeps ``device_ids=None``: detectron2
passes ``device_ids=[local_rank]``, which ``DistributedDataParallel`` rejects for CPU modules.
No other process sees this change.

``--num-gpus 0`` (or 1, on one machine) runs ``main_func`` in this process, as detectron2's
``launch`` does for a world size <= 1. Worker processes end with the launcher
(:func:`die_with_parent`): killing it does not leave them training, holding ``OUTPUT_DIR``.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.engine import defaults as d2_defaults
from detectron2.engine import launch as d2_launch
from detectron2.engine.launch import DEFAULT_TIMEOUT
from detectron2.utils import comm

from ..cli import (
    USER_ERROR_EXIT_CODE,
    UserError,
    debug_requested,
    report_user_error,
    run_tool,
    strip_debug_flag,
)
from ..detectron2_compat import create_local_process_group, find_free_port

__all__ = ["launch", "launch_from_command_line", "die_with_parent"]

_PR_SET_PDEATHSIG = 1  # linux/prctl.h

logger = logging.getLogger(__name__)


def launch(
    main_func: Callable[..., Any],
    num_processes_per_machine: int,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url: str | None = None,
    args: tuple = (),
    timeout: timedelta = DEFAULT_TIMEOUT,
    backend: str | None = None,
) -> None:
    """Run ``main_func(*args)`` in ``num_machines * num_processes_per_machine`` processes.

    Args:
        main_func, num_machines, machine_rank, dist_url, args, timeout: as detectron2's
            ``launch`` (``dist_url="auto"`` picks a free local port; single machine only).
        num_processes_per_machine: GPUs per machine with CUDA, processes per machine without.
        backend: ``"nccl"`` (detectron2's launch, needs CUDA) or ``"gloo"`` (CPU processes);
            default: nccl if CUDA is available, else gloo.
    """
    if num_processes_per_machine < 0 or num_machines < 1:
        raise UserError(f"launch: --num-gpus must be >= 0 and --num-machines >= 1, got "
                        f"{num_processes_per_machine} and {num_machines}")
    world_size = num_machines * num_processes_per_machine
    if world_size <= 1:  # as detectron2's launch: this process (--num-gpus 0 or 1)
        main_func(*args)
        return
    # Workers end with this launcher (a kill of it must not leave them training).
    main_func = functools.partial(_run_dying_with_parent, main_func, os.getpid())
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        d2_launch(main_func, num_processes_per_machine, num_machines, machine_rank, dist_url,
                  args, timeout)
        return
    if backend != "gloo":
        raise ValueError(f"launch: backend must be 'nccl' or 'gloo', got {backend!r}")
    if dist_url in (None, "auto"):
        if num_machines != 1:
            raise ValueError("launch: dist_url='auto' only works on a single machine")
        dist_url = f"tcp://127.0.0.1:{find_free_port()}"
    try:
        mp.spawn(
            _gloo_worker,
            nprocs=num_processes_per_machine,
            args=(main_func, world_size, num_processes_per_machine, machine_rank, dist_url, args,
                  timeout),
            daemon=False,
        )
    except mp.ProcessExitedException as error:
        if error.exit_code == USER_ERROR_EXIT_CODE:  # the worker printed the message
            raise UserError(f"worker process {error.error_index} stopped on the error printed "
                            "above") from None
        raise


def die_with_parent(parent_pid: int) -> None:
    """Have the kernel kill this process when its parent ends (Linux ``PR_SET_PDEATHSIG``),
    and end now if the parent ``parent_pid`` is already gone. Elsewhere: nothing."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):  # pragma: no cover - no prctl
            logger.warning("mabn_d2: cannot ask to end with the launcher (no prctl)")
    if os.getppid() != parent_pid:  # the launcher ended before prctl took effect
        os._exit(1)


def _run_dying_with_parent(main_func: Callable[..., Any], parent_pid: int, *args: Any) -> Any:
    die_with_parent(parent_pid)
    return main_func(*args)


def _gloo_worker(
    local_rank: int,
    main_func: Callable[..., Any],
    world_size: int,
    num_processes_per_machine: int,
    machine_rank: int,
    dist_url: str,
    args: tuple,
    timeout: timedelta,
) -> None:
    global_rank = machine_rank * num_processes_per_machine + local_rank
    dist.init_process_group(
        backend="gloo", init_method=dist_url, world_size=world_size, rank=global_rank,
        timeout=timeout,
    )
    # detectron2's comm.get_local_rank()/get_local_size() read this group.
    create_local_process_group(num_processes_per_machine)
    _let_ddp_wrap_cpu_models()
    comm.synchronize()
    try:
        main_func(*args)
    except UserError as error:  # one message, as in a single process; the launcher says why
        report_user_error(f"worker {global_rank}", error, debug_requested())
        sys.exit(USER_ERROR_EXIT_CODE)
    finally:
        dist.destroy_process_group()


def _let_ddp_wrap_cpu_models() -> None:
    """In this gloo worker: ``create_ddp_model`` leaves ``device_ids`` None for CPU models."""
    original = d2_defaults.create_ddp_model
    if getattr(original, "_mabn_d2_cpu_ddp", False):
        return

    @functools.wraps(original)
    def create_ddp_model(model: torch.nn.Module, **kwargs: Any) -> torch.nn.Module:
        first = next(model.parameters(), None)
        if first is not None and first.device.type == "cpu":
            kwargs.setdefault("device_ids", None)
        return original(model, **kwargs)

    create_ddp_model._mabn_d2_cpu_ddp = True  # type: ignore[attr-defined]
    d2_defaults.create_ddp_model = create_ddp_model
    logger.info("mabn_d2: in this gloo worker, create_ddp_model wraps CPU models without "
                "device_ids")


def launch_from_command_line(tool: str, main_func: Callable[[Any], Any],
                             check_config: Callable[[Any], None],
                             argv: Sequence[str] | None = None) -> int:
    """A training tool's command line (``tools/train_net.py``, ``tools/lazyconfig_train_net.py``):
    detectron2's ``default_argument_parser``, then :func:`launch` of ``main_func(args)``.

    The launch arguments are checked first, and for a multi-process run ``check_config(args)``
    too, before any process starts or anything is created (an in-process run checks its
    config in its own set-up). A user error is one message and exit code 2
    (:func:`mabn_d2.cli.run_tool`; ``--debug``: the traceback). Returns the exit code."""
    from detectron2.engine import default_argument_parser

    from ..validation import check_launch_args  # not at import: validation is tool-side

    argv = sys.argv[1:] if argv is None else list(argv)

    def run() -> None:
        args = default_argument_parser().parse_args(strip_debug_flag(argv))
        print("Command Line Args:", args)
        check_launch_args(args)
        if args.num_gpus * args.num_machines > 1:
            check_config(args)
        launch(main_func, args.num_gpus, num_machines=args.num_machines,
               machine_rank=args.machine_rank, dist_url=args.dist_url, args=(args,))

    return run_tool(tool, run, argv)
