"""Checks of MABN on one device, shared by the CUDA tier and its CPU variants.

Each ``check_*`` function takes the device to run on. ``tests/kernels/test_device_checks.py``
calls them with ``"cuda"`` (tests marked ``cuda``) and the same functions on the CPU (or, for
the host-sync check, on the ``meta`` device, where any read of a tensor value on the host
raises), so that the logic of every CUDA check has run before it first meets a GPU.

References are computed on the CPU in float64 with the plain kernels: ``MABN2d`` there is the
layer that ``tests/layer/test_mabn_reference.py`` holds to an independent transcription of the
paper's formulas.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from detectron2.layers import Conv2d
from torch import Tensor, nn

import mabn_d2  # registers "MABN" in detectron2
from mabn_d2 import MABN2d, MABNSettings, kernels
from mabn_d2.kernels import plain
from mabn_d2.kernels.selfcheck import KERNEL_NAMES, TOLERANCES, kernel_outputs
from mabn_d2.layer import MABNStep, mabn_train

from helpers import CONFIGS, SmallNet, import_script, relative_error, small_backbone_cfg

# A schedule that passes through every phase in SCHEDULE_STEPS steps: batch statistics
# (t < 10), moving averages (10 <= t <= 20), renorm (t > 20), with a clip that binds.
SCHEDULE = dict(buffer_size=4, warmup_iters=10, renorm_start_iter=20, renorm_clip=1.5)
SCHEDULE_STEPS = 32
AMP_DTYPES = (torch.float16, torch.bfloat16)
KERNEL_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
# Relative error of a training run against the float64 reference, by input dtype.
TRAINING_TOLERANCE = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 2e-2}
# Float32 results of two computations that round differently (fused vs unfused convolutions,
# compiled vs eager graphs: other cuDNN or generated kernels); a wrong fold is off by far more.
FLOAT32_TOLERANCE = 1e-4
# Odd sizes for the Triton kernels: a plane of one element, 7x7 (box head), a plane longer
# than one reduction tile and not a multiple of it, long planes, more than 65535 channels,
# more than 65535 planes, a detection shape.
TRITON_SHAPES = [(2, 3, 1, 1), (4, 5, 7, 7), (2, 3, 33, 40), (3, 2, 300, 257),
                 (1, 70000, 1, 1), (700, 100, 1, 1), (2, 256, 50, 68)]
# Triton's CPU interpreter runs one program at a time: small shapes only.
TRITON_INTERPRETER_SHAPES = [(2, 3, 1, 1), (3, 5, 7, 7), (2, 3, 33, 40)]


@contextlib.contextmanager
def exact_float32() -> Iterator[None]:
    """No TF32 in float32 convolutions and matrix products (CUDA's default for cuDNN), so
    float32 results can be compared at float32 precision."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@contextlib.contextmanager
def no_host_sync(device: torch.device) -> Iterator[None]:
    """Any host-device synchronization inside raises: on CUDA through
    ``torch.cuda.set_sync_debug_mode("error")``; on ``meta`` by construction (a meta tensor has
    no values to read)."""
    if device.type == "meta":
        yield
        return
    if device.type != "cuda":
        raise ValueError(f"no_host_sync: cannot detect host syncs on {device}")
    torch.cuda.synchronize(device)
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def autocast_for(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Autocast to ``dtype`` where it is a half dtype, else nothing."""
    if dtype in AMP_DTYPES:
        return torch.autocast(device.type, dtype=dtype)
    return contextlib.nullcontext()


def schedule_batches(shape: tuple[int, ...], steps: int, seed: int = 0) -> list[tuple[Tensor,
                                                                                      Tensor]]:
    """``(x, dy)`` in float64 on the CPU for each step: input scale drifts, and jumps every
    fifth step so the moving averages lag and the renorm clip binds."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for step in range(steps):
        scale = 1.0 + 0.5 * float(torch.rand((), generator=g))
        if step % 5 == 4:
            scale *= 4.0
        x = torch.randn(shape, generator=g, dtype=torch.float64) * scale + 0.3
        dy = torch.randn(shape, generator=g, dtype=torch.float64)
        batches.append((x, dy))
    return batches


def layer_pair(channels: int, device: torch.device, **settings) -> tuple[MABN2d, MABN2d]:
    """A float32 ``MABN2d`` on ``device`` and its float64 CPU twin with the same parameters."""
    g = torch.Generator().manual_seed(1)
    layer = MABN2d(channels, **settings)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(channels, generator=g) + 0.5)
        layer.bias.copy_(torch.randn(channels, generator=g))
    reference = copy.deepcopy(layer).double()
    return layer.to(device), reference


# ---------------------------------------------------------------------------------------------
# The layer against the float64 reference


def check_training_matches_float64_reference(device: str, dtype: torch.dtype = torch.float32,
                                             shape: tuple[int, ...] = (3, 6, 7, 9)) -> None:
    """MABN2d training steps through the whole schedule, then eval, on ``device`` against the
    float64 CPU layer; half ``dtype`` inputs run under autocast (statistics stay float32)."""
    device = torch.device(device)
    tol = TRAINING_TOLERANCE[dtype]
    layer, reference = layer_pair(shape[1], device, **SCHEDULE)
    for x64, dy64 in schedule_batches(shape, SCHEDULE_STEPS):
        x = x64.to(device, dtype).requires_grad_()
        dy = dy64.to(device, dtype)
        with autocast_for(device, dtype):
            y = layer(x)
        y.backward(dy)
        # The reference sees the same (rounded) input and gradient.
        x_ref = x.detach().cpu().double().requires_grad_()
        with kernels.use_backend("plain"):
            y_ref = reference(x_ref)
            y_ref.backward(dy.cpu().double())
        assert y.dtype == dtype and x.grad.dtype == dtype
        for name, got, want in (("y", y, y_ref), ("dx", x.grad, x_ref.grad),
                                ("dweight", layer.weight.grad, reference.weight.grad),
                                ("dbias", layer.bias.grad, reference.bias.grad)):
            err = relative_error(got, want)
            assert err < tol, f"step {layer.iteration}: {name} relative error {err:.3g} >= {tol}"
        layer.weight.grad = layer.bias.grad = reference.weight.grad = reference.bias.grad = None
    assert layer.iteration == reference.iteration == SCHEDULE_STEPS
    for name in MABN2d._STATISTICS:
        got, want = getattr(layer, name), getattr(reference, name)
        assert got.dtype == torch.float32 and got.device.type == device.type, name
        assert relative_error(got, want) < tol, name
    layer.eval()
    reference.eval()
    x64 = schedule_batches(shape, 1, seed=7)[0][0]
    with torch.no_grad(), autocast_for(device, dtype):
        y = layer(x64.to(device, dtype))
    with torch.no_grad():
        y_ref = reference(x64.to(dtype).double())
    assert relative_error(y, y_ref) < tol


# ---------------------------------------------------------------------------------------------
# Triton kernels against the plain kernels


def kernel_inputs(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                  seed: int = 0) -> tuple[Tensor, ...]:
    """``(x, dy, a, b)`` with mixed signs; ``a, b`` in the statistics dtype."""
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 0.5
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    a = torch.rand(c, generator=g, dtype=torch.float64) + 0.5
    b = torch.randn(c, generator=g, dtype=torch.float64)
    sdtype = kernels.statistics_dtype(dtype)
    return x.to(device, dtype), dy.to(device, dtype), a.to(device, sdtype), b.to(device, sdtype)


def reduction_scales(name: str, x: Tensor, dy: Tensor) -> tuple[Tensor, ...]:
    """Per channel, the size of the terms a reduction adds (its error is measured against
    that, since ``sum dy`` and ``sum dy x`` cancel)."""
    x64, dy64 = x.double(), dy.double()
    dims = (0, 2, 3)
    if name == "second_moment":
        return ((x64 * x64).mean(dims),)
    return dy64.abs().sum(dims), (dy64 * x64).abs().sum(dims)


def check_triton_kernels_match_plain(device: str, shapes: list[tuple[int, ...]]) -> None:
    """Every Triton kernel in every dtype against the plain kernel on ``shapes`` (on the CPU:
    under ``TRITON_INTERPRET=1``)."""
    from mabn_d2.kernels import triton as triton_kernels

    device = torch.device(device)
    for dtype in KERNEL_DTYPES:
        output_tol, statistics_tol = TOLERANCES[dtype]
        for shape in shapes:
            inputs = kernel_inputs(shape, dtype, device)
            for name in KERNEL_NAMES:
                got = kernel_outputs(triton_kernels, name, *inputs)
                want = kernel_outputs(plain, name, *inputs)
                where = f"{name} {dtype} {shape}"
                for g, w in zip(got, want):
                    assert g.shape == w.shape and g.dtype == w.dtype, where
                    assert g.device == w.device, where
                if name in ("channel_affine", "grad_input"):
                    err = relative_error(got[0], want[0])
                    assert err <= output_tol, f"{where}: relative error {err:.3g}"
                    continue
                for g, w, scale in zip(got, want, reduction_scales(name, *inputs[:2])):
                    err = float(((g.double() - w.double()).abs() / scale.clamp_min(1e-300))
                                .max())
                    assert err <= statistics_tol, f"{where}: error {err:.3g} of the terms' size"


# ---------------------------------------------------------------------------------------------
# Host-device synchronization


def conv_mabn_block(device: torch.device, channels: int = 8, **settings) -> nn.Sequential:
    """Two detectron2 convs with MABN (centralized weights) and ReLU, as in a ResNet."""
    norm = MABNSettings(**{**SCHEDULE, **settings})
    torch.manual_seed(0)
    block = nn.Sequential(
        Conv2d(3, channels, 3, padding=1, bias=False, norm=norm(channels),
               activation=nn.ReLU()),
        Conv2d(channels, channels, 3, padding=1, bias=False, norm=norm(channels)),
    )
    return block.to(device)


def mabn_layers(model: nn.Module) -> list[MABN2d]:
    return [m for m in model.modules() if isinstance(m, MABN2d)]


def statistics_of(model: nn.Module) -> list[Tensor]:
    return [getattr(m, name).clone() for m in mabn_layers(model) for name in MABN2d._STATISTICS]


def check_training_step_has_no_host_sync(device: str,
                                         dtype: torch.dtype = torch.float32) -> None:
    """Forward + backward of conv + MABN2d blocks through the whole schedule, a non-finite
    batch among them, with host-device syncs forbidden (see :func:`no_host_sync`)."""
    device = torch.device(device)
    block = conv_mabn_block(device).train()
    shape = (2, 3, 12, 10)
    bad_step = 14  # moving-average phase
    xs = [torch.randn(shape, device=device) * (1 + step % 3) for step in range(SCHEDULE_STEPS)]
    xs[bad_step][:, 1, 2, 3] = float("inf")
    dy = torch.randn(2, 8, 12, 10, device=device)
    if device.type != "meta":  # first use: compiles kernels and runs their self-check
        with autocast_for(device, dtype):
            y = block(torch.randn(shape, device=device))
        y.backward(dy.to(y.dtype))
    snapshots = []
    with no_host_sync(device):
        for step, x in enumerate(xs):
            if step == bad_step:
                snapshots.append(statistics_of(block))
            with autocast_for(device, dtype):
                y = block(x)
            y.backward(dy.to(y.dtype))
            if step == bad_step:
                snapshots.append(statistics_of(block))
    warm = 0 if device.type == "meta" else 1
    assert all(m.iteration == SCHEDULE_STEPS + warm for m in mabn_layers(block))
    if device.type == "meta":
        return
    # The first layer saw the inf: its statistics stayed; the second saw non-finite outputs
    # of the first and kept its statistics too.
    for before, after in zip(*snapshots):
        assert torch.equal(before, after)
    for t in statistics_of(block):
        assert torch.isfinite(t).all()


# ---------------------------------------------------------------------------------------------
# Empty batches, channels_last, fuse_mabn


def check_empty_batches(device: str) -> None:
    """Empty inputs (N = 0 or H = 0) in training and eval: empty outputs, zero parameter
    gradients, no state change."""
    device = torch.device(device)
    layer = MABN2d(4, **SCHEDULE).to(device)
    for _ in range(12):
        layer(torch.randn(2, 4, 5, 5, device=device)).sum().backward()
    for training in (True, False):
        layer.train(training)
        for shape in ((0, 4, 7, 7), (2, 4, 0, 5)):
            before = {k: v.clone() for k, v in layer.state_dict().items()}
            layer.weight.grad = layer.bias.grad = None
            x = torch.randn(shape, device=device, requires_grad=True)
            y = layer(x)
            assert y.shape == shape and y.device.type == device.type
            y.sum().backward()
            assert x.grad.shape == shape
            assert not layer.weight.grad.any() and not layer.bias.grad.any()
            for key, value in layer.state_dict().items():
                assert torch.equal(value, before[key]), key


def check_channels_last(device: str) -> None:
    """A channels_last input trains and evaluates exactly as its contiguous copy."""
    device = torch.device(device)
    shape = (2, 6, 9, 7)
    layer, _ = layer_pair(shape[1], device, **SCHEDULE)
    twin = copy.deepcopy(layer)
    for x64, dy64 in schedule_batches(shape, SCHEDULE_STEPS):
        x = x64.float().to(device).requires_grad_()
        x_cl = x.detach().to(memory_format=torch.channels_last).requires_grad_()
        assert not x_cl.is_contiguous()
        dy = dy64.float().to(device)
        y = layer(x)
        y.backward(dy)
        y_cl = twin(x_cl)
        y_cl.backward(dy.to(memory_format=torch.channels_last))
        assert torch.equal(y, y_cl) and torch.equal(x.grad, x_cl.grad)
    for key, value in layer.state_dict().items():
        assert torch.equal(value, twin.state_dict()[key]), key
    layer.eval()
    twin.eval()
    x = torch.randn(shape, device=device)
    with torch.no_grad():
        assert torch.equal(layer(x), twin(x.to(memory_format=torch.channels_last)))


def check_fuse_mabn(device: str) -> None:
    """``fuse_mabn`` of a model trained on ``device``: no MABN left, the same outputs."""
    device = torch.device(device)
    torch.manual_seed(0)
    net = SmallNet().to(device)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    with exact_float32():
        for _ in range(30):
            loss = net(torch.randn(2, 3, 12, 12, device=device) * 2 + 0.5).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        net.eval()
        fused = mabn_d2.fuse_mabn(net)
        assert not mabn_layers(fused)
        assert all(p.device.type == device.type for p in fused.parameters())
        x = torch.randn(3, 3, 16, 20, device=device) * 3
        with torch.no_grad():
            assert relative_error(fused(x), net(x)) < FLOAT32_TOLERANCE


# ---------------------------------------------------------------------------------------------
# CUDA graphs and torch.compile


def check_cuda_graph_capture(device: str) -> None:
    """A training step refuses capture with a clear error (its schedule is host state); an
    eval-mode conv + MABN2d block and its fused form capture and replay correctly."""
    device = torch.device(device)
    block = conv_mabn_block(device).train()
    x = torch.randn(2, 3, 16, 16, device=device)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
        for _ in range(3):
            block(x).sum().backward()
    torch.cuda.current_stream(device).wait_stream(side)
    iteration = mabn_layers(block)[0].iteration
    with pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            block(x)
    assert mabn_layers(block)[0].iteration == iteration
    block.eval()
    for model in (block, mabn_d2.fuse_mabn(block)):
        static_x = x.clone()
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), exact_float32():
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                model(static_x)
            torch.cuda.current_stream(device).wait_stream(side)
            with torch.cuda.graph(graph):
                static_y = model(static_x)
            for seed in range(3):
                new_x = torch.randn(x.shape, device=device,
                                    generator=torch.Generator(device).manual_seed(seed))
                static_x.copy_(new_x)
                graph.replay()
                assert relative_error(static_y, model(new_x)) < FLOAT32_TOLERANCE


def check_torch_compile(device: str, backend: str = "inductor") -> None:
    """``torch.compile`` of a conv + MABN2d block trains and evaluates as the eager block: the
    training step runs eagerly inside the compiled model (a graph break, so its changing
    schedule recompiles nothing), eval compiles."""
    device = torch.device(device)
    eager = conv_mabn_block(device).train()
    compiled_block = copy.deepcopy(eager)
    graphs = []
    compile_graph = torch._dynamo.lookup_backend(backend)

    def counting_backend(graph_module: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(graph_module)
        return compile_graph(graph_module, example_inputs)

    compiled = torch.compile(compiled_block, backend=counting_backend)
    shape = (2, 3, 10, 12)
    with exact_float32():
        for step, (x64, _) in enumerate(schedule_batches(shape, SCHEDULE_STEPS)):
            x = x64.float().to(device).requires_grad_()
            x_c = x.detach().clone().requires_grad_()
            y = eager(x)
            y_c = compiled(x_c)
            dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(step)).to(device)
            y.backward(dy)
            y_c.backward(dy)
            assert relative_error(y_c, y) < FLOAT32_TOLERANCE
            assert relative_error(x_c.grad, x.grad) < FLOAT32_TOLERANCE
        for p, q in zip(eager.parameters(), compiled_block.parameters()):
            assert relative_error(q.grad, p.grad) < FLOAT32_TOLERANCE
        for got, want in zip(statistics_of(compiled_block), statistics_of(eager)):
            assert relative_error(got, want) < FLOAT32_TOLERANCE
        assert all(m.iteration == SCHEDULE_STEPS for m in mabn_layers(compiled_block))
        # The graphs around the eager step compile once, not again at every step (3 here).
        assert len(graphs) <= 4, f"{len(graphs)} graphs compiled in {SCHEDULE_STEPS} steps"
        eager.eval()
        compiled_block.eval()
        x = torch.randn(shape, device=device)
        with torch.no_grad():
            assert relative_error(compiled(x), eager(x)) < FLOAT32_TOLERANCE


# ---------------------------------------------------------------------------------------------
# Synchronized statistics


@contextlib.contextmanager
def one_process_group(device: torch.device, store_file: Path) -> Iterator[None]:
    """A one-process ``torch.distributed`` group: NCCL on CUDA, gloo on the CPU."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"file://{store_file}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def check_sync_under_one_process_group(device: str, store_file: Path) -> None:
    """The synced functional core (all-reduced statistics) equals the per-process one under a
    one-process group, without host syncs on CUDA; a model built with ``MODEL.MABN.SYNC``
    trains in that group."""
    from detectron2.modeling import build_backbone

    device = torch.device(device)
    shape, channels = (2, 5, 6, 7), 5
    steps = [MABNStep(slot=t % 4, use_batch_stats=t <= 4, backward_batch_stats=t <= 4,
                      renorm=t > 8, renorm_clip=1.5, momentum=0.1, eps=1e-5)
             for t in range(1, 13)]

    # Everything on the device before the sync guard: copies from the host synchronize.
    batches = [(x64.float().to(device), dy64.float().to(device))
               for x64, dy64 in schedule_batches(shape, len(steps))]

    def run(layer: MABN2d, group: object | None) -> list[Tensor]:
        state = [layer.running_second_moment, layer.chi2_buffer, layer.psi_buffer]
        outputs = []
        for step, (x0, dy) in zip(steps, batches):
            x = x0.clone().requires_grad_()
            y, _ = mabn_train(x, layer.weight, layer.bias, *state, step, process_group=group)
            y.backward(dy)
            outputs += [y.detach(), x.grad, layer.weight.grad.clone(), layer.bias.grad.clone()]
            layer.weight.grad = layer.bias.grad = None
        return outputs + [t.clone() for t in state]

    with one_process_group(device, store_file):
        alone = run(layer_pair(channels, device)[0], None)
        run(layer_pair(channels, device)[0], dist.group.WORLD)  # sets up the communicator
        layer = layer_pair(channels, device)[0]
        guard = no_host_sync(device) if device.type == "cuda" else contextlib.nullcontext()
        with guard:
            synced = run(layer, dist.group.WORLD)
        for got, want in zip(synced, alone):
            assert relative_error(got, want) < 1e-5
        cfg = small_backbone_cfg("MABN", SYNC=True, WARMUP_ITERS=2, BUFFER_SIZE=2,
                                 RENORM_START_ITER=2)
        cfg.MODEL.DEVICE = str(device)
        backbone = build_backbone(cfg).to(device).train()
        layers = mabn_layers(backbone)
        assert layers and all(m.sync for m in layers)
        for _ in range(3):
            features = backbone(torch.randn(2, 3, 64, 64, device=device))
            sum(f.square().mean() for f in features.values()).backward()
        for m in layers:
            assert m.iteration == 3 and torch.isfinite(m.running_second_moment).all()
            assert m.psi_buffer.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# Mask R-CNN


# Fewer RoIs and detections, for a CPU: the 4-conv box head on 512 RoIs per image dominates.
LIGHT_ROI_SETTINGS = ["MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32",
                      "MODEL.RPN.POST_NMS_TOPK_TRAIN", "64", "MODEL.RPN.POST_NMS_TOPK_TEST", "64",
                      "TEST.DETECTIONS_PER_IMAGE", "16"]


def check_mask_rcnn_with_mabn_everywhere(device: str, out_dir: Path, image_size: int = 256,
                                         iterations: int = 4, light: bool = False) -> None:
    """Mask R-CNN R50-FPN with MABN in the ResNet, FPN and both heads: a few training
    iterations (finite losses, statistics move, every phase of a short schedule), then
    ``DefaultPredictor`` inference with the trained weights. ``light``: fewer RoIs
    (:data:`LIGHT_ROI_SETTINGS`)."""
    from detectron2.config import get_cfg
    from detectron2.engine import DefaultPredictor
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    synthetic_batch = import_script("studies/benchmark.py").synthetic_batch

    device = torch.device(device)
    cfg = mabn_d2.add_mabn_config(get_cfg())
    cfg.merge_from_file(str(CONFIGS / "mask_rcnn_R_50_FPN_2x_mabn_scratch.yaml"))
    cfg.merge_from_list(["MODEL.MABN.WARMUP_ITERS", "2", "MODEL.MABN.BUFFER_SIZE", "2",
                         "MODEL.MABN.RENORM_START_ITER", "2", "MODEL.DEVICE", str(device),
                         # every image gets detections whatever the barely trained scores
                         "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
                         "INPUT.MIN_SIZE_TEST", str(image_size),
                         "INPUT.MAX_SIZE_TEST", str(image_size * 2)])
    if light:
        cfg.merge_from_list(LIGHT_ROI_SETTINGS)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    layers = mabn_layers(model)
    assert len(layers) > 60  # ResNet, FPN, box head and mask head
    batch = synthetic_batch(2, image_size, device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    with EventStorage(0):
        for _ in range(iterations):
            losses = model(batch)
            total = sum(losses.values())
            assert all(torch.isfinite(v) for v in losses.values()), losses
            opt.zero_grad()
            total.backward()
            opt.step()
    for m in layers:
        assert m.iteration == iterations, m.name
        assert (m.running_second_moment != 1).any(), m.name
        assert m.chi2_buffer.abs().sum() > 0 and m.psi_buffer.abs().sum() > 0, m.name
        for name in MABN2d._STATISTICS:
            assert torch.isfinite(getattr(m, name)).all(), (m.name, name)
    weights = Path(out_dir) / "mask_rcnn_mabn.pth"
    torch.save({"model": model.state_dict()}, weights)
    cfg.MODEL.WEIGHTS = str(weights)
    predictor = DefaultPredictor(cfg)
    assert not predictor.model.training
    image = np.random.default_rng(0).integers(0, 255, (image_size, image_size * 4 // 3, 3),
                                              dtype=np.uint8)
    instances = predictor(image)["instances"]
    assert instances.pred_boxes.tensor.device.type == device.type
    assert 0 < len(instances) <= cfg.TEST.DETECTIONS_PER_IMAGE
    assert torch.isfinite(instances.pred_boxes.tensor).all()
    assert instances.pred_masks.shape[1:] == image.shape[:2]
