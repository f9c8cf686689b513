"""The kernels behind MABN2d (C++ CPU, Triton, plain) against float64 formulas."""

from __future__ import annotations

import shutil

import pytest
import torch

from mabn_d2 import MABN2d, kernels
from mabn_d2.kernels import cpp

from helpers import TEST_PATHS, relative_error, run_python, triton_interpreter_problem
from kernel_formulas import (
    DTYPES,
    assert_same_training,
    check_against_formulas,
    expected,
    make_inputs,
    train_steps,
)

# A tiny plane, detection-like planes, a box-head-like shape, and a plane longer than the C++
# kernels' 65536-element segment.
SHAPES = [(2, 3, 1, 1), (2, 5, 13, 17), (16, 8, 7, 7), (1, 2, 300, 260)]


def run_kernels(x, dy, a, b):
    sdtype = a.dtype
    sum_dy, sum_dy_x = kernels.grad_reductions(dy, x, sdtype)
    return {
        "second_moment": kernels.second_moment(x, sdtype),
        "channel_affine": kernels.channel_affine(x, a, b),
        "sum_dy": sum_dy,
        "sum_dy_x": sum_dy_x,
        "grad_input": kernels.grad_input(dy, x, a, b),
    }


def test_cpp_kernels_build_here():
    # On a machine with gcc and ninja (every machine `make venv` sets up) the C++ path must
    # work: a broken build would otherwise only show up as a warning and a slower MABN.
    assert cpp.available(), cpp.load_error()
    assert kernels.backend_for(torch.zeros(1, 2, 3, 3)) == "cpp"


@pytest.mark.parametrize("backend", ["cpp", "plain"])
@pytest.mark.parametrize("dtype,out_tol,stat_tol", DTYPES, ids=lambda v: str(v))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_cpu_kernels_match_formulas(backend, dtype, out_tol, stat_tol, shape):
    x, dy, a, b = make_inputs(shape, dtype)
    with kernels.use_backend(backend):
        got = run_kernels(x, dy, a, b)
    if backend == "plain" and dtype in (torch.float16, torch.bfloat16):
        out_tol *= 2  # the plain affine rounds the coefficients to the half dtype first
    check_against_formulas(got, expected(x, dy, a, b), x, dy, out_tol, stat_tol)


@pytest.mark.parametrize("backend", ["cpp", "plain"])
def test_half_inputs_whose_square_exceeds_half_range(backend):
    # |x| up to ~2000: x^2 ~ 4e6 is far beyond float16's 65504; statistics stay float32.
    x, dy, a, b = make_inputs((2, 4, 9, 11), torch.float16, scale=600.0)
    assert (x.float() ** 2).max() > 65504
    a = a * 1e-3  # keeps the affine outputs inside the half range
    with kernels.use_backend(backend):
        got = run_kernels(x, dy, a, b)
    assert torch.isfinite(got["second_moment"]).all()
    check_against_formulas(got, expected(x, dy, a, b), x, dy, 4e-3, 1e-5)


def test_cpp_reductions_are_deterministic():
    x, dy, _, _ = make_inputs((4, 6, 50, 70), torch.float32)
    with kernels.use_backend("cpp"):
        first = kernels.second_moment(x, torch.float32)
        sums = kernels.grad_reductions(dy, x, torch.float32)
        for _ in range(3):
            assert torch.equal(kernels.second_moment(x, torch.float32), first)
            again = kernels.grad_reductions(dy, x, torch.float32)
            assert all(torch.equal(u, v) for u, v in zip(again, sums))


def test_streaming_stores_give_the_same_bits():
    # >= 32 MiB of float32 with planes of >= 4096 elements: the size at which the C++ kernels
    # write with streaming stores; an odd plane makes every plane start unaligned.
    if not cpp.available():
        pytest.skip("the C++ kernels did not build (test_cpp_kernels_build_here says why)")
    x, dy, a, b = make_inputs((2, 64, 257, 263), torch.float32)
    assert x.nbytes >= 32 << 20
    outputs = {}
    try:
        for mode in ("never", "always"):
            cpp.set_streaming(mode)
            with kernels.use_backend("cpp"):
                outputs[mode] = (kernels.channel_affine(x, a, b), kernels.grad_input(dy, x, a, b))
    finally:
        cpp.set_streaming("auto")
    for plain, streamed in zip(outputs["never"], outputs["always"]):
        assert torch.equal(plain, streamed)
    want = expected(x, dy, a, b)
    assert relative_error(outputs["always"][0], want["channel_affine"]) < 2e-6
    assert relative_error(outputs["always"][1], want["grad_input"]) < 2e-6
    with pytest.raises(ValueError, match="streaming mode"):
        cpp.set_streaming("sometimes")


def test_dispatch_and_forced_backends():
    x = torch.randn(2, 3, 4, 5)
    assert kernels.backend_for(x.transpose(2, 3)) == "plain"  # non-contiguous
    with kernels.use_backend("plain"):
        assert kernels.backend_for(x) == "plain"
    with kernels.use_backend("triton"), pytest.raises(RuntimeError, match="triton.*cpu"):
        kernels.second_moment(x, torch.float32)
    with pytest.raises(ValueError, match="unknown backend"):
        kernels.set_backend("cuda-magic")
    assert kernels.get_backend() == "auto"


def test_mabn2d_cpp_and_plain_backends_agree():
    # All phases (batch statistics, moving averages, renorm) on both backends.
    fast = train_steps("cpp", torch.float64)
    plain = train_steps("plain", torch.float64)
    assert_same_training(fast, plain, 1e-10)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5),
                                       (torch.bfloat16, 1e-2)], ids=str)
@pytest.mark.parametrize("shape", [(3, 4, 6, 5), (2, 3, 300, 230), (64, 6, 7, 7)], ids=str)
def test_fused_step_matches_the_separate_kernels_and_plain(dtype, tol, shape):
    # The fused C++ step against the four C++ kernels and the plain ops, through every phase
    # of the schedule, with non-finite inputs (forward) and gradients (backward) in the
    # batch-statistics phase (steps 2, 5) and the moving-average phases (13, 14, 25, 26).
    if not cpp.available():
        pytest.skip("the C++ kernels did not build (test_cpp_kernels_build_here says why)")
    x = torch.zeros(shape, dtype=dtype)
    layer = MABN2d(shape[1]).to(torch.float64 if dtype == torch.float64 else torch.float32)
    assert kernels.fused_step_applies(x, layer.weight, layer.running_second_moment)
    steps = 30 if shape[2] < 100 else 24
    bad = (2, 5, 13, 14) if steps < 30 else (2, 5, 13, 14, 25, 26)
    fused = train_steps("cpp", dtype, steps, True, shape, bad)
    separate = train_steps("cpp", dtype, steps, False, shape, bad)
    plain = train_steps("plain", dtype, steps, True, shape, bad)
    assert_same_training(fused, separate, tol)
    assert_same_training(fused, plain, tol * 4 if dtype == torch.bfloat16 else tol)


def test_fused_step_is_deterministic_and_streams_the_same_bits():
    if not cpp.available():
        pytest.skip("the C++ kernels did not build (test_cpp_kernels_build_here says why)")
    shape = (2, 64, 257, 263)  # >= 32 MiB float32 with unaligned planes: streaming size
    runs = []
    try:
        for mode in ("never", "always", "always"):
            cpp.set_streaming(mode)
            runs.append(train_steps("cpp", torch.float32, 2, True, shape))
    finally:
        cpp.set_streaming("auto")
    for other in runs[1:]:
        for u, v in zip(runs[0][0], other[0]):
            assert torch.equal(u, v)
        for key in runs[0][1]:
            assert torch.equal(runs[0][1][key], other[1][key])


def test_fused_step_only_where_it_applies_and_checks_its_inputs():
    x = torch.randn(2, 3, 4, 5)
    state32, state64 = torch.zeros(3), torch.zeros(3, dtype=torch.float64)
    assert kernels.fused_step_applies(x, state32) == cpp.available()
    assert not kernels.fused_step_applies(x, state64)  # float64 state, float32 input
    assert not kernels.fused_step_applies(x.transpose(2, 3), state32)
    with kernels.use_backend("plain"):
        assert not kernels.fused_step_applies(x, state32)
    with kernels.use_fused_step(False):
        assert not kernels.fused_step_applies(x, state32)
    if not cpp.available():
        return
    ones, buffer = torch.ones(3), torch.zeros(4, 3)
    with pytest.raises(RuntimeError, match="chi2_buffer must be a contiguous CPU Float tensor"):
        torch.ops.mabn_d2.train_forward(x, ones, ones, ones.clone(), torch.zeros(4, 2), 0, True,
                                        False, 5.0, 0.1, 1e-5)
    with pytest.raises(RuntimeError, match="slot 4 outside"):
        torch.ops.mabn_d2.train_forward(x, ones, ones, ones.clone(), buffer, 4, True, False, 5.0,
                                        0.1, 1e-5)
    with pytest.raises(RuntimeError, match="weight must be"):
        torch.ops.mabn_d2.train_backward(x, x, ones.double(), ones, ones, buffer, 0, True, True,
                                         True)


def test_training_saves_one_activation_sized_tensor():
    layer = MABN2d(8)
    x = torch.randn(2, 8, 16, 16, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    assert sum(t.numel() == x.numel() for t in saved) == 1


@pytest.mark.e2e  # a child Python and a failed C++ build
def test_build_failure_falls_back_to_plain_with_a_warning(tmp_path):
    # A fresh extension cache and a compiler that always fails: a real failed build.
    result = run_python(
        """
        import warnings, torch
        from mabn_d2 import MABN2d, kernels
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            layer = MABN2d(3)
            y = layer(torch.randn(2, 3, 4, 4, requires_grad=True))
            y.sum().backward()
        assert kernels.backend_for(torch.zeros(1, 3, 2, 2)) == "plain"
        messages = [str(w.message) for w in caught if "C++ CPU kernels" in str(w.message)]
        assert len(messages) == 1, messages
        print(messages[0])
        """,
        CXX="/bin/false", TORCH_EXTENSIONS_DIR=str(tmp_path), MABN_D2_KERNELS="auto",
        MABN_D2_CPP_BUILD="jit",  # not the build made at install
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "using the plain PyTorch kernels" in result.stdout
    assert "Reason:" in result.stdout and "/bin/false" in result.stdout  # says why
    assert "could not build the C++ CPU kernels" in result.stderr  # logged too


@pytest.mark.e2e  # a child Python under Triton's interpreter
def test_triton_kernels_under_the_interpreter():
    pytest.importorskip("triton")
    if problem := triton_interpreter_problem():
        pytest.skip(problem)
    result = run_python(
        """
        import torch
        from kernel_formulas import DTYPES, check_against_formulas, expected, make_inputs
        from mabn_d2.kernels import triton as tk
        for dtype, out_tol, stat_tol in DTYPES:
            for shape in [(2, 3, 5, 7), (3, 2, 33, 40)]:
                x, dy, a, b = make_inputs(shape, dtype)
                sum_dy, sum_dy_x = tk.grad_reductions(dy, x, a.dtype)
                got = {
                    "second_moment": tk.second_moment(x, a.dtype),
                    "channel_affine": tk.channel_affine(x, a, b),
                    "sum_dy": sum_dy, "sum_dy_x": sum_dy_x,
                    "grad_input": tk.grad_input(dy, x, a, b),
                }
                check_against_formulas(got, expected(x, dy, a, b), x, dy, out_tol, stat_tol)
        x, dy, a, b = make_inputs((2, 4, 9, 11), torch.float16, scale=600.0)
        got = tk.second_moment(x, torch.float32)
        assert torch.isfinite(got).all() and (x.float() ** 2).max() > 65504
        print("ok")
        """,
        TRITON_INTERPRET="1", paths=TEST_PATHS,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith("ok")


def test_cpp_build_name_covers_every_source_and_header(tmp_path, monkeypatch):
    # The cached build is found by a digest of csrc/: an edit to any file must rebuild.
    csrc = tmp_path / "csrc"
    shutil.copytree(cpp._CSRC, csrc)
    monkeypatch.setattr(cpp, "_CSRC", csrc)
    assert [p.name for p in cpp._sources()] == sorted(p.name for p in csrc.glob("*.cpp"))
    files = sorted([*csrc.glob("*.cpp"), *csrc.glob("*.h")])
    assert len(files) > 2
    flags = ["-O3"]
    digest = cpp._digest(flags)
    for f in files:
        text = f.read_text()
        f.write_text(text + "\n")
        assert cpp._digest(flags) != digest, f.name
        f.write_text(text)
    assert cpp._digest(flags) == digest
    assert cpp._digest(["-O2"]) != digest
