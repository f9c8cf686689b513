"""Multi-process launch on machines without CUDA (gloo), detectron2-compatible.

detectron2's ``launch`` spawns one process per GPU with NCCL and asserts CUDA. On the CPU
(tests, CI, laptops) :func:`launch` spawns the same workers with the gloo backend and sets up
detectron2's per-machine process group, so ``DefaultTrainer``, ``comm`` and the evaluators
work unchanged. With CUDA available it simply calls detectron2's ``launch``.

In the gloo worker processes only, detectron2's ``create_ddp_model`` (which
``DefaultTrainer`` calls) is wrapped so that a CPU model keeps ``device_ids=None``: detectron2
passes ``device_ids=[local_rank]``, which ``DistributedDataParallel`` rejects for CPU modules.
No other process sees this change.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.engine import defaults as d2_defaults
from detectron2.engine import launch as d2_launch
from detectron2.engine.launch import DEFAULT_TIMEOUT
from detectron2.utils import comm

from ..detectron2_compat import create_local_process_group, find_free_port

__all__ = ["launch"]

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
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        d2_launch(main_func, num_processes_per_machine, num_machines, machine_rank, dist_url,
                  args, timeout)
        return
    if backend != "gloo":
        raise ValueError(f"launch: backend must be 'nccl' or 'gloo', got {backend!r}")
    world_size = num_machines * num_processes_per_machine
    if world_size == 1:
        main_func(*args)
        return
    if dist_url in (None, "auto"):
        if num_machines != 1:
            raise ValueError("launch: dist_url='auto' only works on a single machine")
        dist_url = f"tcp://127.0.0.1:{find_free_port()}"
    mp.spawn(
        _gloo_worker,
        nprocs=num_processes_per_machine,
        args=(main_func, world_size, num_processes_per_machine, machine_rank, dist_url, args,
              timeout),
        daemon=False,
    )


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
