"""Measuring MABN statistics on data: calibration before fine-tuning, and MABN's PreciseBN.

Both run batches through the model with every MABN layer side-effect free (eval mode: no
iteration count, buffer or running-statistic update) while forward hooks record, per layer,
the second moment of its input ``chi2 = mean_{N,H,W}(x^2)`` over all batches (weighted by
``N*H*W``, so the result is the population second moment even when the number of RoIs varies).

* :func:`calibrate_mabn` (before training, for layers converted from weights without usable
  statistics): the layers compute their current eval function during the pass, and each
  layer's ``running_second_moment`` becomes the measured ``s`` with ``weight`` compensated,
  ``weight *= sqrt(s + eps) / sqrt(s_old + eps)``, so the eval function is unchanged. As no
  layer's function changes, the inputs of every layer are those of the final model, and one
  pass calibrates all layers at once, whatever their order. Every slot of ``chi2_buffer``
  holds ``s``, and the layer's step count (``num_batches_tracked``) becomes
  ``max(t, m, warmup_iters, renorm_start_iter)``: its running statistic is a population
  value, as at the end of the schedule's warm-up phases, so training continues in the last
  phase, moving averages with batch renormalisation. Its first training step therefore
  computes ``weight * x / sqrt(s + eps) + bias`` (``r`` maps the moving average, in which the
  current batch weighs ``1/m``, onto ``s``; unclipped unless a batch's second moment is
  ``renorm_clip^2`` times off): training starts from the pretrained function, whatever the
  first batch. Without renorm the current batch's share in the moving average scales each
  layer by a per-batch factor that compounds over depth, and a warm-up's batch statistics
  far more (docs/finetuning.md measures both).
* :func:`calibrate_mabn_backward` (after :func:`calibrate_mabn`): the backward moving
  average. ``Psi_B = mean(g * z)`` needs gradients, so it runs training steps without
  updates: forward in training mode, backward of the training loss, ``Psi_B`` read from the
  layer, then every MABN layer's state (buffers, running statistic, step count) and every
  parameter's ``.grad`` put back as they were. Each slot of ``psi_buffer`` becomes the mean
  ``Psi_B`` over the batches, as ``chi2_buffer`` holds ``s``. Without it ``psi_buffer``
  starts at zero and for the first ``m`` steps MABN's backward under-corrects (its
  statistics term starts at ``1/m`` of its value).
* :func:`precise_mabn_stats` (after training, ``TEST.PRECISE_BN``): the statistics are
  recomputed for the fixed weights, which changes the eval function of each layer and hence
  the input of the next. As detectron2's PreciseBN does for BN, every layer normalizes with
  its batch statistic during the pass (the hooks replace the output by
  ``weight * x / sqrt(chi2_B + eps) + bias``), so each layer's statistics are those of its
  input under training-mode normalization, independent of the other layers' old running
  statistics; ``running_second_moment`` becomes their population value; weights, moving-average
  buffers and iteration counts are untouched.

In a multi-process job the sums are all-reduced, so every process sets the same values (the
weights of a DDP model must stay identical across processes).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from detectron2.utils import comm
from detectron2.utils.events import EventStorage
from torch import Tensor, nn

from ..layer import MABN2d, mabn_eval
from .convert import NO_STATISTICS, SOURCE_BN

__all__ = [
    "CALIBRATION_MODES",
    "PRECISE_BN_NUM_ITER",
    "check_calibration_mode",
    "CalibrationReport",
    "calibrate_mabn",
    "calibrate_mabn_backward",
    "precise_mabn_stats",
    "mabn_layers",
    "layers_to_calibrate",
    "read_batches",
]

logger = logging.getLogger(__name__)

# Which layers a calibration measures (MODEL.MABN.CALIBRATION.MODE): see layers_to_calibrate.
CALIBRATION_MODES = ("auto", "always", "never")
# Batches of MABN's PreciseBN when the config does not say: detectron2's TEST.PRECISE_BN.NUM_ITER.
PRECISE_BN_NUM_ITER = 200


def check_calibration_mode(mode: object, key: str = "calibration mode") -> str:
    """``mode`` if it is one of :data:`CALIBRATION_MODES`; else ValueError naming ``key``."""
    if mode not in CALIBRATION_MODES:
        raise ValueError(f"{key} must be one of {CALIBRATION_MODES}, got {mode!r}")
    return mode


def mabn_layers(model: nn.Module) -> dict[str, MABN2d]:
    """``{name: layer}`` of every MABN layer of ``model`` (DDP is unwrapped)."""
    model = getattr(model, "module", model)
    return {name: m for name, m in model.named_modules() if isinstance(m, MABN2d)}


def layers_to_calibrate(model: nn.Module, mode: str = "auto") -> dict[str, MABN2d]:
    """The layers :func:`calibrate_mabn` should measure for ``MODEL.MABN.CALIBRATION.MODE``.

    Candidates are the layers converted from another normalization (``converted_from`` set by
    checkpoint loading or :func:`mabn_d2.convert_bn_to_mabn`: BN statistics, frozen affine,
    norm-less conv); layers of an MABN checkpoint keep their statistics, and new layers keep
    MABN's own initialization (``weight = 1``: they normalize, they do not reproduce anything).
    A layer that was never loaded or converted (``converted_from`` None) is a candidate only for
    ``"always"``.

    * ``"auto"``: the candidates, if at least one of them has no statistics; else none.
    * ``"always"``: the candidates (every layer without a recorded source included).
    * ``"never"``: none.
    """
    check_calibration_mode(mode)
    layers = mabn_layers(model)
    sources = {name: layer.converted_from for name, layer in layers.items()}
    converted = (SOURCE_BN, *NO_STATISTICS)
    if mode == "never":
        return {}
    if mode == "always":
        return {n: m for n, m in layers.items() if sources[n] in (*converted, None)}
    if not any(source in NO_STATISTICS for source in sources.values()):
        return {}
    return {n: m for n, m in layers.items() if sources[n] in converted}


def read_batches(data: Iterable[Any], num_batches: int) -> list[Any]:
    """The first ``num_batches`` batches of ``data`` (fewer if it ends first), read in one
    pass whose iterator is then closed.

    Calibration runs its forward and backward passes over this list rather than iterating
    ``data`` twice: a second ``iter()`` of a loader whose first iterator was abandoned can
    hang. detectron2 v0.6's ``AspectRatioGroupedDataset`` keeps its buckets across iterators
    and empties a full bucket only after its ``yield`` returns; an abandoned iterator leaves
    that bucket full, the next iterator's bucket then never equals the batch size and grows
    without end whenever all images share one orientation. The batches are held in memory
    (``num_batches`` training batches of this process).
    """
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
        raise ValueError(f"MABN calibration: num_batches must be an integer >= 1, got "
                         f"{num_batches!r}")
    iterator = iter(data)
    try:
        return list(itertools.islice(iterator, num_batches))
    finally:
        close = getattr(iterator, "close", None)  # generators: run their clean-up now
        if callable(close):
            close()


@dataclass
class _Moments:
    """Per-layer accumulators: the float64 sum of ``x^2`` per channel, and the element count
    per channel (``N*H*W`` summed over calls)."""

    total: Tensor
    count: int = 0

    def add(self, x: Tensor) -> Tensor:
        """Accumulate one call's input; returns its ``chi2_B``."""
        sum_sq = x.detach().double().square().sum(dim=(0, 2, 3))
        n = x.numel() // x.shape[1]
        self.total = self.total.to(sum_sq.device) + sum_sq
        self.count += n
        return sum_sq / n


@contextlib.contextmanager
def _recording(layers: dict[str, MABN2d], model: nn.Module, batch_normalize: bool
               ) -> Iterator[dict[str, _Moments]]:
    """Within the block, ``layers`` (and any BatchNorm) run side-effect free and record the
    second moments of their inputs; with ``batch_normalize``, the MABN layers' outputs use
    each call's batch statistic instead of the running one."""
    moments = {name: _Moments(torch.zeros(m.num_features, dtype=torch.float64))
               for name, m in layers.items()}
    stateful = [m for m in getattr(model, "module", model).modules()
                if isinstance(m, (MABN2d, nn.modules.batchnorm._BatchNorm))]
    modes = [m.training for m in stateful]

    def hook_for(acc: _Moments):
        def hook(module: MABN2d, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor | None:
            x = inputs[0]
            if x.numel() == 0:
                return None
            chi2 = acc.add(x)
            if batch_normalize:
                return mabn_eval(x, module.weight, module.bias, chi2.to(torch.float32),
                                 module.eps)
            return None

        return hook

    handles = [layers[name].register_forward_hook(hook_for(acc)) for name, acc in moments.items()]
    try:
        for m in stateful:
            m.train(False)
        yield moments
    finally:
        for handle in handles:
            handle.remove()
        for m, mode in zip(stateful, modes):
            m.train(mode)


def _run(model: nn.Module, data: Iterable[Any], num_batches: int,
         moments: dict[str, _Moments]) -> int:
    done = 0
    with torch.no_grad(), EventStorage():  # detectron2 models log events while training
        for batch in itertools.islice(data, num_batches):
            model(batch)
            done += 1
    if done == 0:
        raise ValueError("MABN calibration: the data loader produced no batch")
    return done


def _population_second_moments(moments: dict[str, _Moments]) -> dict[str, Tensor | None]:
    """``sum x^2 / count`` per layer (all-reduced over processes); None for unseen layers."""
    names = sorted(moments)
    if comm.get_world_size() > 1:
        # One all-reduce: every layer's sums (channel counts differ) and element counts.
        sizes = [moments[n].total.numel() for n in names]
        flat = torch.cat([moments[n].total.cpu() for n in names]
                         + [torch.tensor([float(moments[n].count) for n in names],
                                         dtype=torch.float64)])
        device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
        flat = flat.to(device)
        torch.distributed.all_reduce(flat)
        *totals, counts = flat.cpu().split(sizes + [len(names)])
        for name, total, count in zip(names, totals, counts.tolist()):
            moments[name].total, moments[name].count = total, int(count)
    return {n: (moments[n].total.cpu() / moments[n].count if moments[n].count else None)
            for n in names}


@dataclass
class CalibrationReport:
    """What a calibration / precise-statistics pass did.

    Attributes:
        num_batches: batches run through the model.
        updated: ``{layer: (old s, new s)}``, mean over channels, for each updated layer.
        unseen: layers that received no input (e.g. a head without RoIs): left unchanged.
    """

    num_batches: int
    updated: dict[str, tuple[float, float]] = field(default_factory=dict)
    unseen: list[str] = field(default_factory=list)


def _select(model: nn.Module, layers: Sequence[str] | dict[str, MABN2d] | None
            ) -> dict[str, MABN2d]:
    everything = mabn_layers(model)
    if layers is None:
        return everything
    if isinstance(layers, dict):
        return dict(layers)
    unknown = [n for n in layers if n not in everything]
    if unknown:
        raise KeyError(f"not MABN layers of the model: {unknown}")
    return {n: everything[n] for n in layers}


def _measure(model: nn.Module, data: Iterable[Any], num_batches: int,
             layers: Sequence[str] | dict[str, MABN2d] | None, calibrate: bool
             ) -> CalibrationReport:
    """Record second moments (eval function kept for ``calibrate``, batch-normalized
    otherwise) and set the statistics (weight compensated and ``chi2_buffer`` filled for
    ``calibrate``)."""
    selected = _select(model, layers)
    if not selected:
        return CalibrationReport(0)
    with _recording(selected, model, batch_normalize=not calibrate) as moments:
        done = _run(model, data, num_batches, moments)
    report = CalibrationReport(done)
    for name, s_new in _population_second_moments(moments).items():
        layer = selected[name]
        if s_new is None:
            report.unseen.append(name)
            continue
        with torch.no_grad():
            s_old = layer.running_second_moment.double().cpu()
            if calibrate:
                factor = torch.sqrt((s_new + layer.eps) / (s_old + layer.eps))
                layer.weight.mul_(factor.to(layer.weight))
                layer.chi2_buffer.copy_(s_new.to(layer.chi2_buffer).expand_as(layer.chi2_buffer))
                # The statistics are now the population's: the layer is past every warm-up
                # phase of its schedule (see the module docstring).
                layer.iteration = max(layer.iteration, layer.buffer_size, layer.warmup_iters,
                                      layer.renorm_start_iter)
            layer.running_second_moment.copy_(s_new.to(layer.running_second_moment))
        report.updated[name] = (float(s_old.mean()), float(s_new.mean()))
    if report.unseen:
        logger.warning("mabn_d2: %d MABN layers saw no input and keep their statistics: %s",
                       len(report.unseen), ", ".join(report.unseen[:5]))
    return report


def calibrate_mabn(
    model: nn.Module,
    data: Iterable[Any],
    num_batches: int = 20,
    layers: Sequence[str] | dict[str, MABN2d] | None = None,
) -> CalibrationReport:
    """Set the statistics of MABN layers from data, preserving the eval function.

    See the module docstring. The model is called as ``model(batch)`` for ``num_batches``
    batches of ``data`` in its current mode (a detectron2 model in training mode takes the
    training data flow: proposals sampled against the ground truth), without gradients.

    Args:
        model: a model with MABN layers (DDP-wrapped or not).
        data: an iterable of model inputs, e.g. ``read_batches(loader, num_batches)``. To
            run :func:`calibrate_mabn_backward` too, give both the same list: a second pass
            over a detectron2 training loader whose first pass stopped early can hang (see
            :func:`read_batches`).
        num_batches: how many batches to use (fewer if ``data`` ends first).
        layers: names (as in ``model.named_modules()``, DDP unwrapped) or ``{name: layer}``;
            default: every MABN layer.

    Returns:
        a :class:`CalibrationReport`.
    """
    report = _measure(model, data, num_batches, layers, calibrate=True)
    logger.info("mabn_d2: calibrated %d MABN layers on %d batches (mean running second "
                "moment before -> after, first layers: %s)", len(report.updated),
                report.num_batches, ", ".join(f"{n}: {a:.3g} -> {b:.3g}"
                                              for n, (a, b) in list(report.updated.items())[:3]))
    return report


class _ModelState:
    """Every buffer of a model (MABN statistics and step counts, any BatchNorm's running
    statistics) and the MABN layers' host-side step counts: what a training step without
    update changes."""

    def __init__(self, model: nn.Module, layers: dict[str, MABN2d]) -> None:
        self._buffers = [(b, b.detach().clone()) for b in model.buffers()]
        self._iterations = [(layer, layer.iteration) for layer in layers.values()]

    def restore(self) -> None:
        with torch.no_grad():
            for buffer, value in self._buffers:
                buffer.copy_(value)
        for layer, iteration in self._iterations:
            layer.iteration = iteration


def _training_loss(output: Any, loss_fn: Callable[[Any], Tensor] | None) -> Tensor:
    if loss_fn is not None:
        return loss_fn(output)
    if isinstance(output, dict):  # detectron2 models in training mode: {name: loss}
        return sum(output.values())
    if isinstance(output, Tensor) and output.numel() == 1:
        return output
    raise TypeError("MABN backward calibration: the model's output is not a loss (a scalar or "
                    "detectron2's dict of losses); pass loss_fn=")


def calibrate_mabn_backward(
    model: nn.Module,
    data: Iterable[Any],
    num_batches: int = 20,
    layers: Sequence[str] | dict[str, MABN2d] | None = None,
    loss_fn: Callable[[Any], Tensor] | None = None,
) -> CalibrationReport:
    """Fill ``psi_buffer`` of MABN layers with their backward statistic on data.

    See the module docstring. The model must be in training mode; it is called as
    ``model(batch)`` and ``loss_fn(output)`` (default: the sum of detectron2's loss dict, or a
    scalar output) is back-propagated, ``num_batches`` times; no parameter changes, and every
    buffer and every ``.grad`` is as before, except ``psi_buffer`` of the selected layers.

    Args:
        model, data, num_batches, layers: as :func:`calibrate_mabn`.
        loss_fn: maps the model's output to a scalar loss.

    Returns:
        a :class:`CalibrationReport` (``updated``: mean ``|Psi|`` before -> after).
    """
    selected = _select(model, layers)
    if not selected:
        return CalibrationReport(0)
    if not getattr(model, "module", model).training:
        raise ValueError("MABN backward calibration needs the model in training mode")
    state = _ModelState(model, mabn_layers(model))
    iterations = {name: layer.iteration for name, layer in selected.items()}
    grads = [(p, p.grad) for p in model.parameters()]
    sums = {name: torch.zeros(m.num_features, dtype=torch.float64) for name, m in selected.items()}
    counts = dict.fromkeys(selected, 0)
    done = 0
    try:
        with EventStorage():
            for batch in itertools.islice(data, num_batches):
                for p, _ in grads:
                    p.grad = None
                _training_loss(model(batch), loss_fn).backward()
                for name, layer in selected.items():
                    # Called exactly once in this step (not skipped for an empty input):
                    # its backward wrote Psi_B into the slot of the step.
                    if layer.iteration == iterations[name] + 1:
                        psi = layer.psi_buffer[layer.iteration % layer.buffer_size]
                        sums[name] += psi.detach().double().cpu()
                        counts[name] += 1
                state.restore()
                done += 1
    finally:
        state.restore()
        for p, grad in grads:
            p.grad = grad
    if done == 0:
        raise ValueError("MABN calibration: the data loader produced no batch")
    report = CalibrationReport(done)
    for name, layer in selected.items():
        if counts[name] == 0:
            report.unseen.append(name)
            continue
        psi = (sums[name] / counts[name]).to(layer.psi_buffer)
        old = float(layer.psi_buffer.abs().mean())
        with torch.no_grad():
            layer.psi_buffer.copy_(psi.expand_as(layer.psi_buffer))
        report.updated[name] = (old, float(psi.abs().mean()))
    logger.info("mabn_d2: filled the backward moving average (psi_buffer) of %d MABN layers "
                "from %d batches", len(report.updated), done)
    return report


def precise_mabn_stats(
    model: nn.Module,
    data: Iterable[Any],
    num_batches: int = PRECISE_BN_NUM_ITER,
    layers: Sequence[str] | dict[str, MABN2d] | None = None,
) -> CalibrationReport:
    """MABN's PreciseBN: recompute ``running_second_moment`` of every MABN layer as the
    population second moment of its input over ``num_batches`` batches, for the current
    weights (see the module docstring; weights, buffers and iteration counts unchanged).
    Arguments as :func:`calibrate_mabn`.
    """
    report = _measure(model, data, num_batches, layers, calibrate=False)
    logger.info("mabn_d2: precise statistics of %d MABN layers from %d batches",
                len(report.updated), report.num_batches)
    return report
