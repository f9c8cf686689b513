"""MABN on each device: the CUDA tier (``pytest -m cuda``) and its CPU variants.

Every test runs a check of ``tests/kernels/device_checks.py`` on the devices it is
parametrized with:
``"cuda"`` (marked ``cuda``, skipped where CUDA is absent: the tier that
``dev/gpu_check.py`` runs on a GPU machine) and, where the check means something there,
the CPU -- or the ``meta`` device for the host-sync check, where any host read of a tensor
value raises -- so that every CUDA check's logic has run before it first meets a GPU.
"""

from __future__ import annotations

import pytest
import torch

from mabn_d2 import kernels

import device_checks as checks
from helpers import TEST_PATHS, run_python, triton_interpreter_problem

CUDA = pytest.param("cuda", id="cuda", marks=[
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="CUDA tier: no CUDA device here (torch.cuda.is_available() is "
                              "False)"),
])
CPU_AND_CUDA = ["cpu", CUDA]
HALF_DTYPES = [torch.float16, torch.bfloat16]


@pytest.mark.parametrize("device", [CUDA])
def test_triton_kernels_serve_and_pass_their_self_check(device):
    for dtype in checks.KERNEL_DTYPES:
        x = torch.zeros(2, 3, 4, 5, device=device, dtype=dtype)
        assert kernels.backend_for(x) == "triton", (dtype, kernels.self_check_results())
    assert all(not failures for failures in kernels.self_check_results().values())


@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_triton_kernels_match_plain_at_odd_sizes(device):
    if device == "cuda":
        checks.check_triton_kernels_match_plain(device, checks.TRITON_SHAPES)
        return
    pytest.importorskip("triton")
    if problem := triton_interpreter_problem():
        pytest.skip(problem)
    result = run_python(  # Triton's CPU interpreter, in a process of its own
        f"""
        import device_checks
        device_checks.check_triton_kernels_match_plain("cpu", {checks.TRITON_INTERPRETER_SHAPES})
        print("ok")
        """,
        TRITON_INTERPRET="1", paths=TEST_PATHS,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith("ok")


@pytest.mark.parametrize("dtype", [torch.float32, *HALF_DTYPES], ids=str)
@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_training_matches_float64_reference(device, dtype):
    checks.check_training_matches_float64_reference(device, dtype)


@pytest.mark.parametrize("device,dtype", [
    ("meta", torch.float32),  # every host read of a value raises on meta
    *[pytest.param(*CUDA.values, dtype, id=f"cuda-{dtype}", marks=CUDA.marks)
      for dtype in (torch.float32, *HALF_DTYPES)],
])
def test_training_step_has_no_host_sync(device, dtype):
    checks.check_training_step_has_no_host_sync(device, dtype)


def test_host_read_on_meta_is_caught():
    # The meta stand-in above would be worthless if a host read passed unnoticed there.
    with checks.no_host_sync(torch.device("meta")), pytest.raises(RuntimeError, match="meta"):
        bool(torch.ones((), device="meta").isfinite())


@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_empty_batches(device):
    checks.check_empty_batches(device)


@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_channels_last(device):
    checks.check_channels_last(device)


@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_fuse_mabn(device):
    checks.check_fuse_mabn(device)


@pytest.mark.parametrize("device", [CUDA])
def test_cuda_graph_capture(device):
    checks.check_cuda_graph_capture(device)


@pytest.mark.e2e  # torch.compile's code generation
@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_torch_compile(device):
    # The CPU variant skips code generation (aot_eager): same graphs and graph break.
    checks.check_torch_compile(device, backend="inductor" if device == "cuda" else "aot_eager")


@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_sync_under_one_process_group(device, tmp_path):
    checks.check_sync_under_one_process_group(device, tmp_path / "store")


@pytest.mark.e2e  # Mask R-CNN training steps
@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_mask_rcnn_with_mabn_everywhere(device, tmp_path):
    if device == "cuda":
        checks.check_mask_rcnn_with_mabn_everywhere(device, tmp_path, image_size=512,
                                                    iterations=6)
    else:
        checks.check_mask_rcnn_with_mabn_everywhere(device, tmp_path, image_size=128,
                                                    iterations=3, light=True)
