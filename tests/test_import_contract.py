"""What importing mabn_d2 needs and does: the layer and its kernels work in an interpreter where
detectron2 cannot be imported (nothing is registered there, the detectron2 parts say what they
miss), and a bad ``MABN_D2_KERNELS`` fails the first forward, naming the variable, not the
import."""

from __future__ import annotations

from helpers import REPO, run_python


def test_layer_and_kernels_without_detectron2_and_a_bad_kernels_variable():
    result = run_python(
        """
        import sys
        sys.modules["detectron2"] = None  # import detectron2 raises ImportError
        import torch
        import mabn_d2.layer, mabn_d2.kernels
        from mabn_d2 import MABN2d
        layer = MABN2d(3, buffer_size=2, warmup_iters=0)
        x = torch.randn(2, 3, 4, 4)
        try:
            layer(x)
        except ValueError as error:
            print("first use:", error)
        else:
            raise AssertionError("a bad MABN_D2_KERNELS was accepted")
        mabn_d2.kernels.set_backend("auto")
        layer(x).sum().backward()
        assert layer.iteration == 1
        try:
            mabn_d2.add_mabn_config
        except ImportError as error:
            print("detectron2 part:", error)
        assert not [name for name in sys.modules if name.startswith("detectron2.")]
        print("ok")
        """,
        paths=[REPO], MABN_D2_KERNELS="fast-please",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[-1] == "ok"
    assert "first use: the environment variable MABN_D2_KERNELS='fast-please' is not a kernel " \
           "backend; valid: ('auto', 'cpp', 'triton', 'plain') (or unset it)" in lines
    assert any(line.startswith("detectron2 part:") and "detectron2" in line[16:]
               for line in lines), lines
