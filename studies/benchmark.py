#!/usr/bin/env python
"""Speed and memory of MABN against BatchNorm, GroupNorm and a naive MABN, side by side.

Layer level: forward + backward in training mode at detection shapes, for
``MABN2d`` (fast kernels), ``MABN2d`` on the plain PyTorch kernels, ``nn.BatchNorm2d``,
``nn.GroupNorm(32, C)`` and a naive transcription of MABN (several elementwise passes, a
saved ``z``, and a ``.item()`` on the iteration counter in every call: a host-device sync on
a GPU). Times are the median of repeated runs with the candidates interleaved (run 1 of every
candidate, then run 2, ...), so load from other processes hits all of them alike. Peak memory
is the peak of the bytes allocated during one forward + backward (the input, its gradient
buffer and the parameters exist before and are not counted): on the CPU from the allocation
events of PyTorch's profiler (``profile_memory=True``), on CUDA from
``torch.cuda.max_memory_allocated``.

With ``--amp`` (CUDA) the layers are timed a second time with float16 inputs under
``torch.autocast`` (parameters and MABN statistics float32), as in mixed-precision training.

Model level: one Mask R-CNN R50-FPN training iteration (forward, backward, SGD step; 2
synthetic images with 3 boxes and masks each) with MABN / BN / GN in the same places (ResNet,
FPN, 4conv-1fc box head, mask head), and inference per image with fused MABN
(:func:`mabn_d2.fuse_mabn`) / FrozenBN / GN in those places. So that every model does the same
work whatever its random weights, the RPN suppresses no proposal (NMS threshold 1) and the
score threshold is 0 (every model returns 100 detections and runs its mask head on them).

CPU memory: glibc serves blocks of 32 MiB and more with fresh ``mmap`` pages, which the OS
zeroes on first touch; at detection shapes that costs as much as a pass over the data. MABN's
C++ kernels take their large outputs from their own cache of freed blocks
(:func:`mabn_d2.kernels.cpp.set_output_cache_limit`); ``MABN_D2_CPU_CACHE_MB=0`` in the
environment turns it off. ``--reuse-memory`` restarts the benchmark with glibc's
``MALLOC_MMAP_MAX_=0`` and a high ``MALLOC_TRIM_THRESHOLD_`` so every candidate's freed blocks
are reused, as caching allocators (jemalloc, tcmalloc: PyTorch's CPU performance advice) do.
The JSON records both settings.

On CUDA, ``targets`` in the JSON (and the last table) compares the ratios with this
project's targets: layer MABN2d <= 1.0 x cuDNN BatchNorm2d (float32 and AMP), layer peak
memory <= BN, model training iteration <= 1.02 x BN and below GN, fused-MABN inference equal
to FrozenBN within the run-to-run noise.

Examples::

    python studies/benchmark.py                      # everything, CPU (or CUDA if present)
    python studies/benchmark.py --device cuda --amp --image-size 800 --image-width 1333
    python studies/benchmark.py --only layer --reuse-memory
    MABN_D2_CPU_CACHE_MB=0 python studies/benchmark.py --only layer
    python studies/benchmark.py --quick              # small subset, a minute or two
    python studies/benchmark.py --only layer --shapes 2,256,50,68 --repeats 20
    python studies/benchmark.py --json output/benchmark/cpu.json

Writes the numbers to JSON (``--json``) and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes.util
import functools
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

import mabn_d2  # registers the "MABN" norm
from mabn_d2 import MABN2d, kernels
from mabn_d2.kernels import cpp  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# Backbone/FPN levels of 2 images (about 800 x 1088 and smaller), then RoI-head inputs.
LAYER_SHAPES = [(2, 256, 100, 136), (2, 256, 50, 68), (2, 64, 200, 272),
                (512, 256, 7, 7), (1024, 256, 7, 7), (512, 256, 14, 14)]
QUICK_SHAPES = [(2, 256, 50, 68), (256, 256, 7, 7)]
# Layer timing: back-to-back calls in blocks of about this many seconds.
LAYER_BLOCK_S = 0.03
# The memory floor of a training step of a per-channel normalization: forward reads x and
# writes y, backward reads dy and x and writes dx: 5 activation-sized transfers, 2.5 copies.
FLOOR_COPIES = 2.5
FLOOR = "memory_floor"
# Steady state of training: moving averages and the renorm clip are on.
STEADY_STATE_ITERATION = 2000


class _NaiveMABNFunction(torch.autograd.Function):
    """MABN written straight from the formulas: every intermediate is a tensor."""

    @staticmethod
    def forward(ctx, x, weight, bias, var, r, psi_buffer, slot, early):  # type: ignore[override]
        std = torch.sqrt(var.view(1, -1, 1, 1) + 1e-5)
        z = x / std
        y = weight.view(1, -1, 1, 1) * r.view(1, -1, 1, 1) * z + bias.view(1, -1, 1, 1)
        ctx.save_for_backward(z, std, weight, r)
        ctx.psi_buffer, ctx.slot, ctx.early = psi_buffer, slot, early
        return y

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        z, std, weight, r = ctx.saved_tensors
        g = dy * weight.view(1, -1, 1, 1) * r.view(1, -1, 1, 1)
        psi_b = (g * z).mean(dim=(0, 2, 3))
        ctx.psi_buffer[ctx.slot] = psi_b
        psi = psi_b if ctx.early else ctx.psi_buffer.mean(dim=0)
        dx = (g - z * psi.view(1, -1, 1, 1)) / std
        dweight = (dy * r.view(1, -1, 1, 1) * z).sum(dim=(0, 2, 3))
        return dx, dweight, dy.sum(dim=(0, 2, 3)), None, None, None, None, None


class NaiveMABN2d(nn.Module):
    """The baseline: MABN as a direct transcription with a ``.item()`` per call."""

    def __init__(self, c: int, buffer_size: int = 16, momentum: float = 0.02) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(c))
        self.bias = nn.Parameter(torch.zeros(c))
        self.register_buffer("running", torch.ones(c))
        self.register_buffer("chi2_buffer", torch.zeros(buffer_size, c))
        self.register_buffer("psi_buffer", torch.zeros(buffer_size, c))
        self.register_buffer("num_batches_tracked", torch.tensor(0))
        self.m, self.momentum = buffer_size, momentum

    def forward(self, x: Tensor) -> Tensor:
        self.num_batches_tracked += 1
        t = int(self.num_batches_tracked.item())  # the host-device sync
        with torch.no_grad():
            chi2 = x.float().pow(2).mean(dim=(0, 2, 3))
            self.chi2_buffer[t % self.m] = chi2
            early = t <= self.m or t < 100
            var = chi2 if early else self.chi2_buffer.mean(dim=0)
            if t > 1000:
                r = (torch.sqrt(var + 1e-5) / torch.sqrt(self.running + 1e-5)).clamp(0.2, 5.0)
            else:
                r = torch.ones_like(var)
            self.running.mul_(1 - self.momentum).add_(self.momentum * var)
        return _NaiveMABNFunction.apply(
            x, self.weight, self.bias, var, r, self.psi_buffer, t % self.m, early
        )


def steady_state(module: nn.Module) -> nn.Module:
    """Move every MABN layer to a late training iteration (moving averages + renorm on)."""
    for m in module.modules():
        if isinstance(m, MABN2d):
            m.iteration = STEADY_STATE_ITERATION
        elif isinstance(m, NaiveMABN2d):
            m.num_batches_tracked.fill_(STEADY_STATE_ITERATION)
    return module


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(
    candidates: dict[str, Callable[[], object]], repeats: int, warmup: int, device: torch.device,
    block_s: float = 0.0,
) -> dict[str, dict[str, float]]:
    """Median (and min, max) seconds per call of each candidate; round i of every candidate
    before round i+1, so load from other processes hits all of them alike.

    Without ``block_s`` (model level) a run is one call after a ``gc.collect()``. With it
    (layer level), as ``torch.utils.benchmark`` measures: Python's garbage collector paused,
    one untimed call, then a block of back-to-back calls lasting about ``block_s`` (at least
    one; sized from the warm-up rounds), timed together. That is the cost of a layer whose
    input and threads are warm, as inside a network. The untimed call -- the first after the
    other candidates, with cold caches and sleeping threads -- is reported as
    ``first_call_median_s``.
    """
    times: dict[str, list[float]] = {name: [] for name in candidates}
    first: dict[str, list[float]] = {name: [] for name in candidates}
    calls = dict.fromkeys(candidates, 1)

    def timed(fn: Callable[[], object], n: int = 1) -> float:
        synchronize(device)
        start = time.perf_counter()
        for _ in range(n):
            fn()
        synchronize(device)
        return (time.perf_counter() - start) / n

    for run in range(warmup + repeats):
        gc.collect()
        if block_s:
            gc.disable()
        try:
            for name, fn in candidates.items():
                if not block_s:
                    gc.collect()
                first_call = timed(fn) if block_s else 0.0
                elapsed = timed(fn, calls[name])
                if run < warmup:
                    calls[name] = max(1, round(block_s / elapsed))
                else:
                    times[name].append(elapsed)
                    first[name].append(first_call)
        finally:
            gc.enable()
    results = {}
    for name, v in times.items():
        results[name] = {"median_s": statistics.median(v), "min_s": min(v), "max_s": max(v),
                         "runs": len(v)}
        if block_s:
            results[name]["calls_per_run"] = calls[name]
            results[name]["first_call_median_s"] = statistics.median(first[name])
    return results


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak of the bytes allocated while ``fn`` runs, above what was allocated before."""
    gc.collect()
    if device.type == "cuda":
        synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
        key=lambda e: e.start_ns(),
    )
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


@dataclass
class LayerCandidate:
    module: nn.Module
    backend: str = ""  # kernel backend to force ("" for non-MABN modules)
    fused: bool = True  # the C++ fused training step (else the four separate kernels)


def layer_candidates(c: int, device: torch.device,
                     only: list[str] | None = None) -> dict[str, LayerCandidate]:
    """The layer candidates (``only``: these and BatchNorm2d, the ratios' base)."""
    candidates = all_layer_candidates(c, device)
    if only:
        candidates = {k: v for k, v in candidates.items() if k in only or k == "BatchNorm2d"}
    return candidates


def all_layer_candidates(c: int, device: torch.device) -> dict[str, LayerCandidate]:
    candidates = {
        "MABN2d": LayerCandidate(steady_state(MABN2d(c)), "auto"),
        # The four separate C++ kernels (no fused step): what the fused step saves.
        "MABN2d_unfused": LayerCandidate(steady_state(MABN2d(c)), "auto", fused=False),
        "MABN2d_plain": LayerCandidate(steady_state(MABN2d(c)), "plain"),
        "BatchNorm2d": LayerCandidate(nn.BatchNorm2d(c)),
        "GroupNorm32": LayerCandidate(nn.GroupNorm(32, c)),
        "naive_MABN": LayerCandidate(steady_state(NaiveMABN2d(c))),
    }
    if kernels.backend_for(torch.zeros(1, 1, 1, 1, device=device)) != "cpp":
        del candidates["MABN2d_unfused"]  # no C++ kernels for this device
    return candidates


def layer_step(candidate: LayerCandidate, x: Tensor, dy: Tensor,
               amp: bool = False) -> Callable[[], None]:
    """One training forward + backward of the candidate's module, with its kernel choices
    (``amp``: under float16 autocast)."""
    module = candidate.module

    def run() -> None:
        x.grad = None
        for p in module.parameters():
            p.grad = None
        with contextlib.ExitStack() as stack:
            if candidate.backend:
                stack.enter_context(kernels.use_backend(candidate.backend))
                stack.enter_context(kernels.use_fused_step(candidate.fused))
            if amp:
                stack.enter_context(torch.autocast(x.device.type, dtype=torch.float16))
            module(x).backward(dy)

    return run


def bench_shape(shape: tuple[int, ...], repeats: int, device: torch.device,
                with_memory: bool, amp: bool = False, only: list[str] | None = None) -> list[dict]:
    """Layer rows of one shape; ``amp``: float16 inputs under autocast (float32 parameters)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    dtype = torch.float16 if amp else torch.float32
    x = (torch.randn(shape, generator=g) * 2 + 0.3).to(device, dtype).requires_grad_()
    dy = torch.randn(shape, generator=g).to(device, dtype)
    steps = {}
    for name, candidate in layer_candidates(shape[1], device, only).items():
        candidate.module.to(device).train()
        steps[name] = layer_step(candidate, x, dy, amp)
    # The floor, timed among the candidates: one copy of the activation into a warm buffer.
    warm = torch.empty_like(x)
    timing = interleaved_medians({**steps, FLOOR: lambda: warm.copy_(x.detach())}, repeats,
                                 warmup=2, device=device, block_s=LAYER_BLOCK_S)
    floor = timing.pop(FLOOR)["median_s"] * FLOOR_COPIES
    memory = {}
    if with_memory:
        for name, fn in steps.items():
            x.grad = None  # the gradient buffer is allocated inside, for every candidate
            memory[name] = peak_bytes(fn, device)
    bn = timing["BatchNorm2d"]["median_s"]
    bn_first = timing["BatchNorm2d"]["first_call_median_s"]
    rows = []
    for name, t in timing.items():
        row = {"shape": list(shape), "precision": "amp_float16" if amp else "float32",
               "candidate": name, **t, "ratio_to_bn": t["median_s"] / bn,
               "first_call_ratio_to_bn": t["first_call_median_s"] / bn_first,
               "memory_floor_s": floor, "ratio_to_floor": t["median_s"] / floor}
        if with_memory:
            row["peak_bytes"] = memory[name]
            row["peak_ratio_to_bn"] = memory[name] / memory["BatchNorm2d"]
        rows.append(row)
    return rows


def bench_layers(shapes, repeats: int, device: torch.device, with_memory: bool,
                 amp: bool = False, only: list[str] | None = None) -> list[dict]:
    """Rows of every shape in float32, and with ``amp`` again under float16 autocast."""
    rows = []
    for precision_amp in (False, True) if amp else (False,):
        for shape in shapes:
            shape_rows = bench_shape(shape, repeats, device, with_memory, precision_amp, only)
            print_layer_rows(shape_rows)
            rows += shape_rows
            gc.collect()
    return rows


def print_layer_rows(rows: list[dict]) -> None:
    shape = tuple(rows[0]["shape"])
    mabn = next(r for r in rows if r["candidate"] == "MABN2d")["median_s"]
    print(f"\nlayer fwd+bwd, training mode, shape {shape}, {rows[0]['precision']}, load "
          f"{os.getloadavg()[0]:.1f}; memory "
          f"floor ({FLOOR_COPIES} copies into a warm buffer) {rows[0]['memory_floor_s'] * 1e3:.2f}"
          " ms")
    print(f"  {'candidate':<17}{'median ms':>10}{'/floor':>8}{'/BN':>7}{'/MABN2d':>9}"
          f"{'first/BN':>10}{'peak MB':>9}{'mem/BN':>8}")
    for r in rows:
        mem = (f"{r['peak_bytes'] / 2**20:>9.1f}{r['peak_ratio_to_bn']:>8.2f}"
               if "peak_bytes" in r else "")
        print(f"  {r['candidate']:<17}{r['median_s'] * 1e3:>10.2f}{r['ratio_to_floor']:>8.2f}"
              f"{r['ratio_to_bn']:>7.2f}{r['median_s'] / mabn:>9.2f}"
              f"{r['first_call_ratio_to_bn']:>10.2f}{mem}", flush=True)


# ---------------------------------------------------------------------------------------------
# Model level


def model_cfg(norm: str, image_size: int, device: torch.device, width: int | None = None):
    from detectron2.config import get_cfg

    cfg = get_cfg()
    mabn_d2.add_mabn_config(cfg)
    cfg.merge_from_file(str(REPO / "configs" / "mask_rcnn_R_50_FPN_2x_mabn_scratch.yaml"))
    cfg.MODEL.RESNETS.NORM = cfg.MODEL.FPN.NORM = norm
    cfg.MODEL.ROI_BOX_HEAD.NORM = cfg.MODEL.ROI_MASK_HEAD.NORM = norm
    cfg.MODEL.DEVICE = str(device)
    cfg.INPUT.MIN_SIZE_TEST = image_size
    cfg.INPUT.MAX_SIZE_TEST = max(width or 0, image_size * 2)
    # The same work for every model whatever its (random) weights: no proposal is suppressed
    # (exactly POST_NMS_TOPK proposals per image) and every model returns 100 detections.
    cfg.MODEL.RPN.NMS_THRESH = 1.0
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    return cfg


def image_width(image_size: int, width: int | None) -> int:
    return width or image_size * 4 // 3


def synthetic_batch(n: int, image_size: int, device: torch.device, seed: int = 0,
                    width: int | None = None) -> list[dict]:
    """``n`` images (3, S, W) (``W = 4S/3`` unless given) with 3 boxes and their box masks
    each, detectron2's format."""
    from detectron2.structures import BitMasks, Boxes, Instances

    g = torch.Generator().manual_seed(seed)
    h, w = image_size, image_width(image_size, width)
    batch = []
    for _ in range(n):
        xy = torch.rand(3, 2, generator=g) * torch.tensor([w * 0.6, h * 0.6])
        wh = torch.rand(3, 2, generator=g) * torch.tensor([w * 0.3, h * 0.3]) + 16
        boxes = torch.cat([xy, xy + wh], dim=1)
        masks = torch.zeros(3, h, w, dtype=torch.bool)
        for i, (x0, y0, x1, y1) in enumerate(boxes.round().long().tolist()):
            masks[i, y0:y1, x0:x1] = True
        inst = Instances((h, w), gt_boxes=Boxes(boxes), gt_classes=torch.randint(0, 80, (3,),
                         generator=g), gt_masks=BitMasks(masks))
        image = (torch.rand(3, h, w, generator=g) * 255).to(device)
        batch.append({"image": image, "height": h, "width": w, "instances": inst.to(device)})
    return batch


def bench_model_training(repeats: int, image_size: int, device: torch.device,
                         width: int | None = None,
                         norms: tuple[str, ...] = ("MABN", "BN", "GN")) -> list[dict]:
    from detectron2.modeling import build_model

    batch = synthetic_batch(2, image_size, device, width=width)
    steps = {}
    for norm in norms:
        torch.manual_seed(0)
        model = steady_state(build_model(model_cfg(norm, image_size, device, width)).train())
        opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

        def step(model=model, opt=opt) -> None:
            losses = model(batch)
            opt.zero_grad(set_to_none=True)
            sum(losses.values()).backward()
            opt.step()

        steps[norm] = step
    from detectron2.utils.events import EventStorage

    with EventStorage(0):  # detectron2's training-time loss logging needs one
        timing = interleaved_medians(steps, repeats, warmup=1, device=device)
    w = image_width(image_size, width)
    base = timing["BN"]["median_s"] if "BN" in timing else float("nan")
    rows = [{"candidate": k, "images": 2, "image_size": image_size, "image_width": w, **v,
             "ratio_to_bn": v["median_s"] / base} for k, v in timing.items()]
    print(f"\nMask R-CNN R50-FPN training iteration (2 images of {image_size}x{w}, forward + "
          "backward + SGD step)")
    for r in rows:
        print(f"  {r['candidate']:<10}{r['median_s']:>9.3f} s{r['ratio_to_bn']:>8.2f} x BN",
              flush=True)
    return rows


def bench_model_inference(repeats: int, image_size: int, device: torch.device,
                          width: int | None = None, deployed_too: bool = True) -> list[dict]:
    """Eager (``model(inputs)``, as ``DefaultPredictor``) and, with ``deployed_too``, deployed
    (:func:`mabn_d2.deploy.trace.trace_for_deployment`: traced, frozen, optimized for inference)."""
    from detectron2.modeling import build_model

    from mabn_d2.deploy.trace import trace_for_deployment

    image = synthetic_batch(1, image_size, device, seed=1, width=width)[0]["image"]
    runs = {}
    info = {}
    for name, norm in (("fused_MABN", "MABN"), ("FrozenBN", "FrozenBN"), ("GN", "GN")):
        torch.manual_seed(0)
        model = build_model(model_cfg(norm, image_size, device, width)).eval()
        if norm == "MABN":
            model = mabn_d2.fuse_mabn(model, inplace=True)

        def run(model=model) -> list:
            with torch.no_grad():
                return model([{"image": image}])

        runs[name] = run
        info[name] = {"detections": len(run()[0]["instances"])}
        if not deployed_too:
            continue
        deployed = trace_for_deployment(model, image)
        with torch.no_grad():
            eager = model.inference([{"image": image}], do_postprocess=False)[0]
        traced = deployed(image)
        # The deployed model must compute what the eager one does.
        info[f"{name}_deployed"] = {
            "detections": len(traced),
            "max_box_diff_to_eager": (traced.pred_boxes.tensor - eager.pred_boxes.tensor)
            .abs().max().item(),
            "max_score_diff_to_eager": (traced.scores - eager.scores).abs().max().item(),
        }
        runs[f"{name}_deployed"] = functools.partial(deployed, image)
    timing = interleaved_medians(runs, repeats, warmup=1, device=device)
    w = image_width(image_size, width)
    rows = []
    for k, v in timing.items():
        mode = "_deployed" if k.endswith("_deployed") else ""
        frozen_bn, fused = timing[f"FrozenBN{mode}"], timing[f"fused_MABN{mode}"]
        rows.append({"candidate": k, "mode": "deployed" if mode else "eager",
                     "image_size": image_size, "image_width": w, **info[k], **v,
                     "ratio_to_frozen_bn": v["median_s"] / frozen_bn["median_s"],
                     "ratio_to_fused_mabn": v["median_s"] / fused["median_s"]})
    if not deployed_too:
        print_inference_rows(rows, f"{image_size}x{w}", "eager only")
        return rows
    # Each model in its faster form: a deployment picks that, whichever it is.
    fastest = {name: min((timing[name], timing[f"{name}_deployed"]), key=lambda v: v["median_s"])
               for name in ("fused_MABN", "FrozenBN", "GN")}
    for name, v in fastest.items():
        rows.append({"candidate": f"{name}_fastest", "mode": "fastest",
                     "fastest_form": "deployed" if v is timing[f"{name}_deployed"] else "eager",
                     "image_size": image_size, "image_width": w,
                     "detections": info[name]["detections"], **v,
                     "ratio_to_frozen_bn": v["median_s"] / fastest["FrozenBN"]["median_s"],
                     "ratio_to_fused_mabn": v["median_s"] / fastest["fused_MABN"]["median_s"]})
    print_inference_rows(rows, f"{image_size}x{w}", "deployed: traced + frozen + "
                         "optimize_for_inference; fastest: the faster of the two")
    return rows


def print_inference_rows(rows: list[dict], size: str, note: str) -> None:
    print(f"\nMask R-CNN R50-FPN inference per image ({size}); {note}")
    for r in rows:
        print(f"  {r['candidate']:<20}{r['median_s']:>9.3f} s{r['ratio_to_frozen_bn']:>8.2f} x "
              f"FrozenBN{r['ratio_to_fused_mabn']:>8.2f} x fused MABN  "
              f"({r['detections']} detections)", flush=True)


# This project's speed and memory targets (docs/speed.md); set for CUDA, where the
# comparison is with cuDNN's BatchNorm.
LAYER_TIME_TARGET = 1.0  # MABN2d / BatchNorm2d, forward + backward, float32 and AMP
LAYER_MEMORY_TARGET = 1.0  # MABN2d / BatchNorm2d peak bytes
TRAINING_TIME_TARGET = 1.02  # MABN / BN training iteration (and MABN below GN)
NOISE_FLOOR = 0.01  # "equal within noise": at least 1 %


def _target(name: str, value: float, limit: float | None, strict: bool = False) -> dict:
    met = None if limit is None else (value < limit if strict else value <= limit)
    return {"target": name, "value": value, "limit": limit,
            "comparison": None if limit is None else ("<" if strict else "<="), "met": met}


def targets(results: dict) -> list[dict]:
    """Each target with the measured ratio, its limit and whether it is met (``met`` None: a
    ratio reported without a target). Inference "equal to FrozenBN within noise": not slower
    than FrozenBN by more than FrozenBN's own spread of run times (min to max, >= 1 %)."""
    rows = []
    for r in results.get("layer", []):
        if r["candidate"] != "MABN2d":
            continue
        where = f"{tuple(r['shape'])} {r['precision']}"
        rows.append(_target(f"layer time MABN2d / BN {where}", r["ratio_to_bn"],
                            LAYER_TIME_TARGET))
        if "peak_ratio_to_bn" in r:
            rows.append(_target(f"layer peak memory MABN2d / BN {where}", r["peak_ratio_to_bn"],
                                LAYER_MEMORY_TARGET))
    training = {r["candidate"]: r for r in results.get("model_training", [])}
    if {"MABN", "BN", "GN"} <= set(training):  # (--model-norms may leave some out)
        mabn = training["MABN"]
        rows.append(_target("training iteration MABN / BN", mabn["ratio_to_bn"],
                            TRAINING_TIME_TARGET))
        rows.append(_target("training iteration MABN / GN",
                            mabn["median_s"] / training["GN"]["median_s"], 1.0, strict=True))
    inference = {r["candidate"]: r for r in results.get("model_inference", [])
                 if r["mode"] == "eager"}
    if inference:
        frozen = inference["FrozenBN"]
        noise = max(NOISE_FLOOR, (frozen["max_s"] - frozen["min_s"]) / frozen["median_s"])
        rows.append(_target("inference fused MABN / FrozenBN (eager)",
                            inference["fused_MABN"]["ratio_to_frozen_bn"], 1.0 + noise))
        rows.append(_target("inference GN / fused MABN (eager)",
                            inference["GN"]["ratio_to_fused_mabn"], None))
    return rows


def markdown(results: dict) -> str:
    """The results as Markdown tables (for docs/speed.md and the README)."""
    lines = []
    if "layer" in results:
        lines += ["| shape | precision | candidate | median ms | / floor | / BN | naive / this "
                  "| first call / BN | peak MB | mem / BN |",
                  "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in results["layer"]:
            naive = next((q for q in results["layer"] if q["shape"] == r["shape"]
                          and q["precision"] == r["precision"]
                          and q["candidate"] == "naive_MABN"), None)
            naive_ratio = f"{naive['median_s'] / r['median_s']:.2f}" if naive else "-"
            mem = (f"{r['peak_bytes'] / 2**20:.1f} | {r['peak_ratio_to_bn']:.2f}"
                   if "peak_bytes" in r else "- | -")
            lines.append(f"| {tuple(r['shape'])} | {r['precision']} | {r['candidate']} "
                         f"| {r['median_s'] * 1e3:.1f} | {r['ratio_to_floor']:.2f} "
                         f"| {r['ratio_to_bn']:.2f} | {naive_ratio} "
                         f"| {r['first_call_ratio_to_bn']:.2f} | {mem} |")
        lines.append("")
    if "matrix" in results:
        lines += ["| shape | allocator | output cache | MABN ms | BN ms | floor ms | MABN / floor "
                  "| BN / floor | MABN / BN | load |",
                  "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in sorted(results["matrix"], key=lambda r: (r["shape"], r["allocator"])):
            lines.append(f"| {tuple(r['shape'])} | {r['allocator']} | {r['output_cache']} "
                         f"| {r['mabn_ms']:.2f} | {r['bn_ms']:.2f} | {r['floor_ms']:.2f} "
                         f"| {r['mabn_to_floor']:.2f} | {r['bn_to_floor']:.2f} "
                         f"| {r['mabn_to_bn']:.2f} | {r['loadavg_start'][0]:.1f} |")
        lines.append("")
    if "model_training" in results:
        lines += ["| training iteration (2 images) | median s | / BN |", "| --- | ---: | ---: |"]
        lines += [f"| {r['candidate']} | {r['median_s']:.2f} | {r['ratio_to_bn']:.2f} |"
                  for r in results["model_training"]]
        lines.append("")
    if "model_inference" in results:
        lines += ["| inference per image | median s | / FrozenBN | / fused MABN |",
                  "| --- | ---: | ---: | ---: |"]
        lines += [f"| {r['candidate']} | {r['median_s']:.2f} | {r['ratio_to_frozen_bn']:.2f} | "
                  f"{r['ratio_to_fused_mabn']:.2f} |" for r in results["model_inference"]]
        lines.append("")
    if results.get("targets"):
        lines += ["| target | measured | limit | met |", "| --- | ---: | ---: | --- |"]
        for t in results["targets"]:
            limit = "-" if t["limit"] is None else f"{t['comparison']} {t['limit']:.2f}"
            met = "-" if t["met"] is None else ("yes" if t["met"] else "**no**")
            lines.append(f"| {t['target']} | {t['value']:.3f} | {limit} | {met} |")
        lines.append("")
    return "\n".join(lines)


def environment(device: torch.device) -> dict:
    info = {
        "device": str(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mabn_kernels": kernels.backend_for(torch.zeros(1, 1, 1, 1, device=device)),
        "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE", ""),
        "cpu_memory": "reused (glibc MALLOC_MMAP_MAX_=0)" if os.environ.get(REUSE_ENV)
        else "default (fresh pages for large blocks)",
        "allocator": os.environ.get(ALLOCATOR_ENV, "glibc"),
        "LD_PRELOAD": os.environ.get("LD_PRELOAD", ""),
        "loadavg_start": os.getloadavg(),
    }
    if device.type == "cpu":  # (loads the C++ kernels if not loaded yet)
        limit = cpp.output_cache_stats().get("limit", 0)
        info["mabn_output_cache_mib"] = "what the model needs" if limit < 0 else limit >> 20
        info["cpp_build"] = cpp.build_info()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
        info["triton_self_check"] = kernels.self_check_results()
    return info


def parse_shapes(text: list[str] | None, quick: bool) -> list[tuple[int, ...]]:
    if not text:
        return QUICK_SHAPES if quick else LAYER_SHAPES
    try:
        shapes = [tuple(int(v) for v in s.split(",")) for s in text]
    except ValueError:
        raise SystemExit(f"--shapes: expected integers N,C,H,W, got {text}") from None
    for s in shapes:
        if len(s) != 4 or min(s) < 1:
            raise SystemExit(f"--shapes: expected N,C,H,W, each >= 1, got {s}")
    return shapes


# glibc reads these at start-up: --reuse-memory re-executes the benchmark with them.
REUSE_ENV = "MABN_D2_BENCH_REUSE_MEMORY"
REUSE_MALLOC = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40), REUSE_ENV: "1"}


# CPU allocators to compare (LD_PRELOAD; Debian packages libjemalloc2, libtcmalloc-minimal4).
ALLOCATORS = {"glibc": "", "jemalloc": "jemalloc", "tcmalloc": "tcmalloc_minimal"}
ALLOCATOR_ENV = "MABN_D2_BENCH_ALLOCATOR"


def allocator_library(name: str) -> str | None:
    """The shared library to preload for allocator ``name`` ("" for glibc), None if absent."""
    if name not in ALLOCATORS:
        raise SystemExit(f"--allocator: one of {sorted(ALLOCATORS)}, got {name!r}")
    return ctypes.util.find_library(ALLOCATORS[name]) if ALLOCATORS[name] else ""


def restart_with_allocator(name: str) -> None:
    """Re-execute this benchmark with allocator ``name`` preloaded (glibc: none)."""
    if os.environ.get(ALLOCATOR_ENV, "glibc") == name:
        return
    library = allocator_library(name)
    if library is None:
        raise SystemExit(f"--allocator {name}: its library is not installed (Debian: "
                         "apt-get install libjemalloc2 libtcmalloc-minimal4)")
    env = {**os.environ, ALLOCATOR_ENV: name, "LD_PRELOAD": library}
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def restart_reusing_memory() -> None:
    """Re-execute this benchmark with freed memory kept for reuse (see the module docstring)."""
    if os.environ.get(REUSE_ENV):
        return
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **REUSE_MALLOC})


def allocator_matrix(args: argparse.Namespace) -> dict:
    """MABN2d and BatchNorm2d, each against the memory floor, under every installed allocator
    with MABN's output cache on and off: one child process per cell (an allocator is chosen
    at process start), both layers and the floor interleaved inside it."""
    passed = ["--threads", str(args.threads)] if args.threads else []
    for key in ("shapes", "repeats"):
        value = getattr(args, key)
        if value:
            passed += [f"--{key}", *(value if isinstance(value, list) else [str(value)])]
    out = Path(args.json)
    cells, rows = [], []
    for allocator in ALLOCATORS:
        if allocator_library(allocator) is None:
            print(f"matrix: {allocator} is not installed, skipped", flush=True)
            continue
        for cache in ("on", "off"):
            cell_json = out.with_name(f"{out.stem}_{allocator}_cache_{cache}.json")
            env = {**os.environ, "MABN_D2_CPU_CACHE_MB": "0"} if cache == "off" else {
                k: v for k, v in os.environ.items() if k != "MABN_D2_CPU_CACHE_MB"}
            print(f"\n=== matrix: {allocator}, output cache {cache}", flush=True)
            subprocess.run([sys.executable, __file__, "--only", "layer", "--no-memory",
                            "--device", "cpu", "--allocator", allocator, "--candidates",
                            "MABN2d", "--json", str(cell_json), *passed], env=env, check=True)
            cell = json.loads(cell_json.read_text())
            cells.append({"allocator": allocator, "output_cache": cache,
                          "environment": cell["environment"]})
            by_shape: dict[tuple, dict] = {}
            for r in cell["layer"]:
                by_shape.setdefault(tuple(r["shape"]), {})[r["candidate"]] = r
            for shape, c in by_shape.items():
                mabn, bn = c["MABN2d"], c["BatchNorm2d"]
                rows.append({"allocator": allocator, "output_cache": cache, "shape": list(shape),
                             "mabn_ms": mabn["median_s"] * 1e3, "bn_ms": bn["median_s"] * 1e3,
                             "floor_ms": mabn["memory_floor_s"] * 1e3,
                             "mabn_to_floor": mabn["ratio_to_floor"],
                             "bn_to_floor": bn["ratio_to_floor"],
                             "mabn_to_bn": mabn["ratio_to_bn"],
                             "loadavg_start": cell["environment"]["loadavg_start"],
                             "loadavg_end": cell["environment"]["loadavg_end"]})
    results = {"matrix": rows, "cells": cells}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    out.with_suffix(".md").write_text(markdown(results))
    print("\n" + markdown(results))
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda if present)")
    parser.add_argument("--only", choices=["layer", "model", "training", "inference"],
                        help="run one part only (model = training + inference)")
    parser.add_argument("--quick", action="store_true",
                        help="small subset: two small layer shapes, 3 model repeats, small images")
    parser.add_argument("--shapes", nargs="*", help="layer shapes N,C,H,W (default: 4 shapes)")
    parser.add_argument("--repeats", type=int, help="timed runs per candidate (default 10)")
    parser.add_argument("--model-repeats", type=int, help="timed model runs (default 5)")
    parser.add_argument("--image-size", type=int, help="shorter image side (default 512)")
    parser.add_argument("--image-width", type=int,
                        help="image width (default 4/3 of --image-size)")
    parser.add_argument("--amp", action="store_true",
                        help="layers also with float16 inputs under autocast (CUDA)")
    parser.add_argument("--no-deployed", action="store_true",
                        help="inference: eager models only (no tracing)")
    parser.add_argument("--no-memory", action="store_true", help="skip peak-memory runs")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--json", default="output/benchmark/benchmark.json",
                        help="where to write the numbers")
    parser.add_argument("--reuse-memory", action="store_true",
                        help="CPU: restart with glibc keeping freed memory (no fresh pages)")
    parser.add_argument("--allocator", choices=sorted(ALLOCATORS),
                        help="CPU: restart with this allocator preloaded (default: as started)")
    parser.add_argument("--candidates", nargs="*",
                        help="layer candidates to time (BatchNorm2d always; default: all)")
    parser.add_argument("--model-norms", nargs="*", default=["MABN", "BN", "GN"],
                        help="training part: the norms to compare (default MABN BN GN)")
    parser.add_argument("--matrix", action="store_true",
                        help="layer part: MABN2d and BatchNorm2d under every installed "
                        "allocator, output cache on and off (one process each), one table")
    args = parser.parse_args(argv)
    for key in ("repeats", "model_repeats", "image_size", "threads"):
        value = getattr(args, key)
        if value is not None and value < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1, got {value}")
    if args.matrix:
        return allocator_matrix(args)
    if args.allocator and argv is None:
        restart_with_allocator(args.allocator)
    if args.reuse_memory and argv is None:
        restart_reusing_memory()

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (5 if args.quick else 10)
    model_repeats = args.model_repeats or (3 if args.quick else 5)
    image_size = args.image_size or (256 if args.quick else 512)
    results: dict = {"environment": environment(device)}
    print(f"environment: {json.dumps(results['environment'])}")
    if args.only in (None, "layer"):
        results["layer"] = bench_layers(
            parse_shapes(args.shapes, args.quick), repeats, device, not args.no_memory, args.amp,
            args.candidates,
        )
    if args.only in (None, "model", "training"):
        results["model_training"] = bench_model_training(model_repeats, image_size, device,
                                                         args.image_width,
                                                         tuple(args.model_norms))
    if args.only in (None, "model", "inference"):
        results["model_inference"] = bench_model_inference(
            model_repeats, image_size, device, args.image_width, not args.no_deployed)
    results["environment"]["loadavg_end"] = os.getloadavg()
    if device.type == "cpu":  # what the output cache held at the end, and its hits
        results["environment"]["mabn_output_cache_end"] = cpp.output_cache_stats()
        # the process's peak resident memory (Linux: ru_maxrss in KiB)
        results["environment"]["peak_rss_mib"] = (
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    results["targets"] = targets(results)
    if device.type == "cuda":
        print("\ntargets (CUDA)")
        for t in results["targets"]:
            verdict = "-" if t["met"] is None else ("met" if t["met"] else "NOT MET")
            print(f"  {t['target']:<58}{t['value']:>8.3f}  {verdict}", flush=True)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    out.with_suffix(".md").write_text(markdown(results))
    print(f"\nwrote {out} and {out.with_suffix('.md')}")
    return results


if __name__ == "__main__":
    main()
