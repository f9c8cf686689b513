"""Record the batch statistics of normalization layers during training.

For a normalization layer with input ``x``, output ``y = gamma * x_hat + beta`` and loss
gradient ``dy = dL/dy``, the paper (Yan et al., ICLR 2020, Sec. 3) names four batch statistics,
per channel ``c``, averaged over the batch and spatial positions (``N, H, W``):

* forward:  ``mu_B = mean(x)`` and ``sigma2_B = mean((x - mu_B)^2)``;
* backward: ``g_B = mean(g)`` and ``Psi_B = mean(g * x_hat)`` with ``g = dL/dx_hat = gamma * dy``.

``x_hat`` is the layer's own normalized activation, ``(y - beta) / gamma``: for BatchNorm in
training it is ``(x - mu_B) / sqrt(sigma2_B + eps)``; for :class:`~mabn_d2.MABN2d` it is
``r * x / sqrt(var + eps)``, so ``Psi_B`` is exactly the ``psi_B`` that MABN averages. Both
backward statistics are computed without dividing by ``gamma``:
``g_B = gamma * mean(dy)`` and ``Psi_B = mean(dy * (y - beta))``. Layers without affine
parameters use ``gamma = 1``, ``beta = 0``.

* :class:`BatchStatsRecorder` (plain PyTorch): ``arm()`` before a training step,
  ``collect()`` after its backward pass.
* :class:`BatchStatsHook` (detectron2): records every ``period`` iterations into the
  trainer's ``EventStorage`` (hence ``metrics.json`` and TensorBoard) as scalars named
  ``batch_stats/<layer>/<stat>/c<channel>``.
* :func:`add_batch_stats_config` / :func:`build_batch_stats_hook`: the ``BATCH_STATS`` config
  node (``PERIOD`` 0 = off) and the hook it asks for.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

import torch
from detectron2.config import CfgNode as CN
from detectron2.engine import HookBase
from detectron2.layers import FrozenBatchNorm2d
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..kernels import statistics_dtype
from ..layer import MABN2d

__all__ = [
    "NORM_TYPES",
    "find_norm_layers",
    "BatchStatsRecorder",
    "BatchStatsHook",
    "scalar_name",
    "to_scalars",
    "add_batch_stats_config",
    "build_batch_stats_hook",
]

STAT_NAMES = ("mu", "var", "g", "psi")
# Layers that normalize with statistics of the current batch (FrozenBatchNorm2d does not).
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.modules.instancenorm._InstanceNorm,
    MABN2d,
)


def _reduce_dims(t: Tensor) -> list[int]:
    if t.dim() < 2:
        raise ValueError(f"batch statistics need a (N, C, ...) tensor, got shape {tuple(t.shape)}")
    return [d for d in range(t.dim()) if d != 1]


def _channel_view(v: Tensor | None, like: Tensor) -> Tensor | None:
    if v is None:
        return None
    return v.detach().to(like.dtype).view([1, -1] + [1] * (like.dim() - 2))


@torch.no_grad()
def forward_statistics(x: Tensor) -> dict[str, Tensor]:
    """``mu_B`` and ``sigma2_B`` (biased) per channel of ``x (N, C, ...)``, float32/64."""
    dims = _reduce_dims(x)
    xs = x.detach().to(statistics_dtype(x.dtype))
    mu = xs.mean(dim=dims)
    var = (xs - mu.view([1, -1] + [1] * (x.dim() - 2))).square().mean(dim=dims)
    return {"mu": mu, "var": var}


@torch.no_grad()
def backward_statistics(
    y: Tensor, dy: Tensor, weight: Tensor | None, bias: Tensor | None
) -> dict[str, Tensor]:
    """``g_B = gamma * mean(dy)`` and ``Psi_B = mean(dy * (y - beta))`` per channel.

    Args:
        y: the layer's output ``(N, C, ...)``.
        dy: ``dL/dy``, same shape.
        weight, bias: ``gamma``, ``beta`` of shape ``(C,)``, or None (no affine).
    """
    if dy.shape != y.shape:
        raise ValueError(f"dy has shape {tuple(dy.shape)}, y has shape {tuple(y.shape)}")
    dims = _reduce_dims(y)
    sdtype = statistics_dtype(y.dtype)
    ys, dys = y.detach().to(sdtype), dy.detach().to(sdtype)
    beta = _channel_view(bias, ys)
    x_hat_times_gamma = ys if beta is None else ys - beta
    g = dys.mean(dim=dims)
    if weight is not None:
        g = g * weight.detach().to(sdtype)
    psi = (dys * x_hat_times_gamma).mean(dim=dims)
    return {"g": g, "psi": psi}


def find_norm_layers(
    model: nn.Module, patterns: Sequence[str] = (), types: tuple[type, ...] = NORM_TYPES
) -> dict[str, nn.Module]:
    """The normalization layers of ``model`` by qualified name.

    Args:
        patterns: regular expressions matched (``re.search``) against the qualified names;
            empty: every layer of ``types``. A pattern that matches none is an error.
        types: the layer classes that count as normalization layers (FrozenBatchNorm2d never
            does: it has no batch statistics).
    """
    layers = {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, types) and not isinstance(m, FrozenBatchNorm2d)
    }
    if not patterns:
        return layers
    selected = {}
    for pattern in patterns:
        regex = re.compile(pattern)
        hits = {name: m for name, m in layers.items() if regex.search(name)}
        if not hits:
            raise ValueError(
                f"batch statistics: pattern {pattern!r} matches no normalization layer; the "
                f"model has {len(layers)}: {', '.join(list(layers)[:8])}"
                + (", ..." if len(layers) > 8 else "")
            )
        selected.update(hits)
    return selected


class BatchStatsRecorder:
    """Records the four batch statistics of chosen layers for armed training steps.

    Usage::

        recorder = BatchStatsRecorder(find_norm_layers(model, ["res2.0.conv1.norm"]))
        recorder.arm()
        loss = model(batch); loss.backward()
        stats = recorder.collect()    # {layer: {"mu", "var", "g", "psi": Tensor (C,)}}

    Only the first call of each layer after :meth:`arm` is recorded (a layer called several
    times per step, e.g. once per normalization group, reports its first group). The backward
    statistics need the output to require grad; otherwise only ``mu`` and ``var`` are
    reported. With loss scaling (AMP) ``g`` and ``psi`` include the scale.
    """

    def __init__(self, layers: Mapping[str, nn.Module]) -> None:
        if not layers:
            raise ValueError("BatchStatsRecorder: no layers to record")
        self.layers = dict(layers)
        self._armed = False
        self._stats: dict[str, dict[str, Tensor]] = {}
        self._handles: list[RemovableHandle] = [
            layer.register_forward_hook(self._make_forward_hook(name))
            for name, layer in self.layers.items()
        ]

    def _make_forward_hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            if not self._armed or name in self._stats:
                return
            stats = forward_statistics(inputs[0])
            self._stats[name] = stats
            if isinstance(output, Tensor) and output.requires_grad:
                # A copy: the caller may modify the output in place (e.g. F.relu_).
                y = output.detach().clone()
                weight = getattr(module, "weight", None)
                bias = getattr(module, "bias", None)

                def on_grad(dy: Tensor) -> None:
                    stats.update(backward_statistics(y, dy, weight, bias))

                output.register_hook(on_grad)

        return hook

    @property
    def armed(self) -> bool:
        return self._armed

    def arm(self) -> None:
        """Record the next forward (and its backward) of every layer."""
        self._stats = {}
        self._armed = True

    def collect(self) -> dict[str, dict[str, Tensor]]:
        """The statistics recorded since :meth:`arm` (call after the backward); disarms."""
        stats, self._stats, self._armed = self._stats, {}, False
        return stats

    def remove(self) -> None:
        """Remove the hooks from the layers."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._armed = False

    def __enter__(self) -> BatchStatsRecorder:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def scalar_name(layer: str, stat: str, channel: int) -> str:
    """``batch_stats/<layer>/<stat>/c<channel>``: the EventStorage key of one value."""
    return f"batch_stats/{layer}/{stat}/c{channel}"


def to_scalars(
    stats: Mapping[str, Mapping[str, Tensor]], channels: Iterable[int]
) -> dict[str, float]:
    """Flatten :meth:`BatchStatsRecorder.collect`'s result for the chosen channels."""
    channels = list(channels)
    out = {}
    for layer, layer_stats in stats.items():
        for stat in STAT_NAMES:
            if stat not in layer_stats:
                continue
            values = layer_stats[stat]
            for c in channels:
                if not -values.numel() <= c < values.numel():
                    raise ValueError(
                        f"batch statistics: channel {c} out of range for {layer!r} "
                        f"({values.numel()} channels)"
                    )
                out[scalar_name(layer, stat, c)] = float(values[c])
    return out


class BatchStatsHook(HookBase):
    """detectron2 hook: every ``period`` iterations, record the batch statistics of the
    chosen normalization layers into the trainer's EventStorage (``batch_stats/...``).

    Recording happens at iterations ``i`` with ``(i + 1) % period == 0``, the iterations at
    which detectron2's ``PeriodicWriter`` (period 20) writes, so with ``period`` a multiple of
    the writer's period every recorded value reaches ``metrics.json`` and TensorBoard. Put
    this hook before the ``PeriodicWriter`` in the hook list.
    """

    def __init__(
        self, period: int, layers: Sequence[str] = (), channels: Sequence[int] = (0,)
    ) -> None:
        if not isinstance(period, int) or period < 1:
            raise ValueError(f"BatchStatsHook: period must be an int >= 1, got {period!r}")
        if not channels:
            raise ValueError("BatchStatsHook: channels must name at least one channel")
        self._period = period
        self._patterns = tuple(layers)
        self._channels = tuple(int(c) for c in channels)
        self._recorder: BatchStatsRecorder | None = None

    def before_train(self) -> None:
        model = self.trainer.model
        # DistributedDataParallel: layer names as in the unwrapped model.
        model = getattr(model, "module", model)
        self._recorder = BatchStatsRecorder(find_norm_layers(model, self._patterns))

    def before_step(self) -> None:
        if (self.trainer.iter + 1) % self._period == 0:
            self._recorder.arm()

    def after_step(self) -> None:
        if self._recorder is None or not self._recorder.armed:
            return
        scalars = to_scalars(self._recorder.collect(), self._channels)
        self.trainer.storage.put_scalars(smoothing_hint=False, **scalars)

    def after_train(self) -> None:
        if self._recorder is not None:
            self._recorder.remove()
            self._recorder = None


def add_batch_stats_config(cfg: CN) -> CN:
    """Add the ``BATCH_STATS`` node to ``cfg`` (in place; existing keys are kept).

    * ``PERIOD`` (0): record every this many iterations; 0 turns the recorder off.
    * ``LAYERS`` ([]): regular expressions selecting norm layers by name; [] = all of them.
    * ``CHANNELS`` ([0]): the channels written for each layer and statistic.
    """
    if "BATCH_STATS" not in cfg:
        cfg.BATCH_STATS = CN()
    node = cfg.BATCH_STATS
    for key, value in (("PERIOD", 0), ("LAYERS", []), ("CHANNELS", [0])):
        if key not in node:
            setattr(node, key, value)
    return cfg


def build_batch_stats_hook(cfg: CN) -> BatchStatsHook | None:
    """The hook ``cfg.BATCH_STATS`` asks for, or None when ``PERIOD`` is 0 (or no node)."""
    node = cfg.get("BATCH_STATS")
    if node is None:
        return None
    period = node.get("PERIOD", 0)
    if isinstance(period, bool) or not isinstance(period, int) or period < 0:
        raise ValueError(f"BATCH_STATS.PERIOD must be an int >= 0, got {period!r}")
    if period == 0:
        return None
    layers = list(node.get("LAYERS", []))
    channels = list(node.get("CHANNELS", [0]))
    if not all(isinstance(p, str) for p in layers):
        raise ValueError(f"BATCH_STATS.LAYERS must be a list of regular expressions, got {layers}")
    if not channels or not all(isinstance(c, int) and not isinstance(c, bool) for c in channels):
        raise ValueError(f"BATCH_STATS.CHANNELS must be a non-empty list of ints, got {channels}")
    return BatchStatsHook(period, layers, channels)
