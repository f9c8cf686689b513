"""Deployment: a (fused) detectron2 model as an optimized TorchScript module.

:func:`trace_for_deployment` runs detectron2's export path -- ``TracingAdapter`` and
``torch.jit.trace`` over ``model.inference(..., do_postprocess=False)``, as detectron2's own
export tests do -- then freezes the traced module (parameters become constants, so folds such
as FrozenBN's affine into the conv happen) and, by default, applies
``torch.jit.optimize_for_inference`` (on the CPU: oneDNN convolutions with pre-packed weights
and conv + ReLU / conv + add fusion). After :func:`mabn_d2.fuse_mabn` the model is a plain conv
net, so every conv can be fused this way; a GroupNorm between a conv and its ReLU cannot
(docs/speed.md measures what that costs).

The traced graph holds the example image's control flow: like any traced detectron2 model it
is valid for inputs that take the same branches (tested: another image size than the
example's; see detectron2's ``TracingAdapter`` for what tracing cannot capture).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from detectron2.structures import Instances
from torch import Tensor, nn

from ..integration.patch import import_tracing_adapter

__all__ = ["DeployedModel", "trace_for_deployment"]


@dataclass
class DeployedModel:
    """A traced, frozen (and optimized) model: ``deployed(image) -> Instances``.

    ``module`` is the ``torch.jit.ScriptModule`` (``module.save(path)`` writes it);
    ``outputs_schema`` turns its flat outputs back into detectron2 ``Instances``.
    """

    module: torch.jit.ScriptModule
    outputs_schema: object

    def __call__(self, image: Tensor) -> Instances:
        """``image``: ``(3, H, W)`` in the model's input format; boxes are in its coordinates
        (no post-processing to another output size, as with ``do_postprocess=False``)."""
        if not isinstance(image, Tensor) or image.dim() != 3:
            got = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
            raise ValueError(f"expected one image tensor of shape (3, H, W), got {got}")
        with torch.no_grad():
            return self.outputs_schema(self.module(image))


def _inference(model: nn.Module, image: Tensor) -> Instances:
    return model.inference([{"image": image}], do_postprocess=False)[0]


def trace_for_deployment(model: nn.Module, example_image: Tensor,
                         optimize: bool = True) -> DeployedModel:
    """Trace ``model`` (a detectron2 meta-architecture with ``inference``, in eval mode) on
    ``example_image`` (``(3, H, W)``), freeze it, and optimize it for inference.

    Fuse MABN first (:func:`mabn_d2.fuse_mabn`); training-mode models are refused, since a
    trace would bake in one batch's statistics.
    """
    if model.training:
        raise ValueError("trace_for_deployment needs an eval-mode model (call model.eval())")
    if not hasattr(model, "inference"):
        raise TypeError(f"{type(model).__name__} has no inference(); expected a detectron2 "
                        "meta-architecture such as GeneralizedRCNN")
    adapter = import_tracing_adapter()(model, example_image, _inference)
    with torch.no_grad():
        traced = torch.jit.trace(adapter, adapter.flattened_inputs, check_trace=False)
        module = torch.jit.freeze(traced.eval())
        if optimize:
            module = torch.jit.optimize_for_inference(module)
    return DeployedModel(module, adapter.outputs_schema)
