"""The Triton kernels check themselves against the plain kernels before first use on a
(device, dtype); a kernel that raises or differs falls back to the plain kernels with one
warning. Simulated on the CPU: fake broken kernel modules in this process, and the real
Triton kernels (one made uncompilable) under Triton's interpreter in a subprocess."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch

from mabn_d2 import kernels
from mabn_d2.kernels import plain
from mabn_d2.kernels.selfcheck import KERNEL_NAMES, SelfCheck, compare_kernels

from helpers import TEST_PATHS, run_python, triton_interpreter_problem
from kernel_formulas import assert_identical_training, train_steps


def kernel_module(broken: str = "", how: str = "") -> SimpleNamespace:
    """The plain kernels as a stand-in backend, with kernel ``broken`` raising (``how`` =
    "raises"), off by 1% ("wrong") or returning NaN ("nan")."""
    functions = {name: getattr(plain, name) for name in KERNEL_NAMES}
    if broken:
        good = functions[broken]

        def bad(*args):
            if how == "raises":
                raise RuntimeError("simulated: PTX compilation failed")
            out = good(*args)
            if how == "wrong":
                return tuple(t * 1.01 for t in out) if isinstance(out, tuple) else out * 1.01
            return tuple(t * float("nan") for t in out) if isinstance(out, tuple) \
                else out * float("nan")

        functions[broken] = bad
    return SimpleNamespace(**functions)


@pytest.fixture
def use_stand_in(monkeypatch):
    """Make ``module`` the Triton backend for CPU tensors, with fresh self-check verdicts:
    what the dispatcher does for CUDA tensors, here on the CPU."""

    def install(module: SimpleNamespace, check: SelfCheck | None = None) -> SelfCheck:
        check = check or SelfCheck("Triton")
        monkeypatch.setattr(kernels, "_triton_module", module)
        monkeypatch.setattr(kernels, "_triton_check", check)
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # lets "triton" take CPU tensors
        return check

    return install


@pytest.mark.parametrize("how", ["raises", "wrong", "nan"])
@pytest.mark.parametrize("broken", KERNEL_NAMES)
def test_broken_kernel_falls_back_to_plain_with_one_warning(use_stand_in, broken, how):
    use_stand_in(kernel_module(broken, how))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = train_steps("triton", torch.float32, steps=25)
        with kernels.use_backend("triton"):
            assert kernels.backend_for(torch.zeros(2, 3, 4, 5)) == "plain"
    messages = [str(w.message) for w in caught if "self-check" in str(w.message)]
    assert len(messages) == 1, messages
    assert f"kernel(s) {broken} failed" in messages[0] and "cpu torch.float32" in messages[0]
    assert "plain PyTorch kernels serve" in messages[0]
    assert set(kernels.self_check_results()["cpu float32"]) == {broken}
    assert_identical_training(got, train_steps("plain", torch.float32, steps=25))


def test_passing_kernels_serve_and_are_checked_once_per_device_and_dtype(use_stand_in):
    calls = []

    def counting_compare(module, device, dtype):
        calls.append((device, dtype))
        return compare_kernels(module, device, dtype)

    use_stand_in(kernel_module(), SelfCheck("Triton", counting_compare))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning at all
        for dtype in (torch.float32, torch.float64, torch.float32):
            train_steps("triton", dtype, steps=3)
        with kernels.use_backend("triton"):
            assert kernels.backend_for(torch.zeros(2, 3, 4, 5)) == "triton"
    assert calls == [(torch.device("cpu"), torch.float32), (torch.device("cpu"), torch.float64)]
    assert kernels.self_check_results() == {"cpu float32": {}, "cpu float64": {}}


def test_check_reports_wrong_shape_or_dtype():
    def wrong_dtype(x, scale, shift):
        return plain.channel_affine(x, scale, shift).double()

    module = SimpleNamespace(**{**vars(kernel_module()), "channel_affine": wrong_dtype})
    failures = compare_kernels(module, "cpu", torch.float32)
    assert list(failures) == ["channel_affine"] and "torch.float64" in failures["channel_affine"]


def test_triton_on_the_cpu_only_when_chosen_under_the_interpreter(monkeypatch):
    x = torch.zeros(2, 3, 4, 5)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with kernels.use_backend("triton"), pytest.raises(RuntimeError, match="triton.*cpu"):
        kernels.second_moment(x, torch.float32)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernels.backend_for(x) != "triton"  # "auto" never picks the interpreter


@pytest.mark.e2e  # a child Python under Triton's interpreter
def test_real_triton_kernels_pass_and_an_uncompilable_one_falls_back():
    pytest.importorskip("triton")
    if problem := triton_interpreter_problem():
        pytest.skip(problem)
    result = run_python(
        """
        import warnings, torch
        from mabn_d2 import kernels
        from mabn_d2.kernels import triton as tk
        from mabn_d2.kernels.selfcheck import compare_kernels
        from kernel_formulas import assert_identical_training, assert_same_training, train_steps
        for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
            assert compare_kernels(tk, "cpu", dtype) == {}, dtype  # no false alarm
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            working = train_steps("triton", torch.float64, steps=12)
        assert not [w for w in caught if "self-check" in str(w.message)]
        assert_same_training(working, train_steps("plain", torch.float64, steps=12), 1e-10)
        tk._ELEMENTWISE_BLOCK = 1000  # not a power of 2: the elementwise kernels fail to build
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = train_steps("triton", torch.float32, steps=12)
        messages = [str(w.message) for w in caught if "self-check" in str(w.message)]
        assert len(messages) == 1, messages
        assert "channel_affine, grad_input failed" in messages[0], messages[0]
        assert "power of 2" in messages[0], messages[0]
        assert_identical_training(got, train_steps("plain", torch.float32, steps=12))
        assert kernels.self_check_results()["cpu float64"] == {}
        print("ok")
        """,
        TRITON_INTERPRET="1", paths=TEST_PATHS,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith("ok")
