"""Stand-in for detectron2's compiled extension ``detectron2._C``.

Installed by ``tools/install_detectron2.py`` only when detectron2 had to be installed from
its pure-Python v0.6 sources (PyPI sdist ``pb1-detectron2==0.6``, which lacks
``detectron2/layers/csrc``). detectron2 imports ``_C`` at import time in a few modules, but
the Mask R-CNN path (box/mask heads, FPN, ResNet, ROIAlign from torchvision, pycocotools
COCOeval) never calls it. Every compiled op raises a clear error instead of pretending to
work: deformable convolution, rotated boxes / ROIAlignRotated, and the C++ COCO evaluator
(``COCOEvaluator(..., use_fast_impl=True)``).
"""

from typing import NoReturn

_HOW_TO_FIX = (
    "this detectron2 is the pure-Python v0.6 source install made by mabn_d2's "
    "tools/install_detectron2.py, without the compiled extension detectron2._C. "
    "Install detectron2 upstream main with its compiled ops to get it (python "
    "tools/install_detectron2.py --force --source git, or --source with its source tarball; "
    "docs/install.md), or avoid this op (use COCOEvaluator(..., use_fast_impl=False))."
)


class CompiledOpsMissingError(AttributeError):
    """Raised when code needs an op of detectron2's compiled extension.

    An AttributeError, as for any missing module attribute, so ``hasattr(_C, op)`` is
    truthfully False; a direct use raises this message.
    """


def get_compiler_version() -> str:
    # Read by detectron2.utils.collect_env (default_setup logs it): say what this is.
    return "none (detectron2._C not built: pure-Python v0.6 sources)"


def get_cuda_version() -> str:
    return "none (detectron2._C not built)"


def has_cuda() -> bool:
    return False


def __getattr__(name: str) -> NoReturn:
    if name.startswith("__"):
        raise AttributeError(name)
    raise CompiledOpsMissingError(f"detectron2._C.{name} is not available: {_HOW_TO_FIX}")
