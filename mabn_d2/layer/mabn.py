"""``MABN2d``: Moving Average Batch Normalization for ``(N, C, H, W)`` inputs."""

from __future__ import annotations

import logging
import numbers
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..kernels import statistics_dtype
from .functional import MABNStep, mabn_eval, mabn_train
from .settings import SETTINGS, check_setting

__all__ = ["MABN2d"]

logger = logging.getLogger(__name__)


class _BackwardToken:
    """Set when the gradient of one training call's output has been computed."""

    __slots__ = ("done", "__weakref__")

    def __init__(self) -> None:
        self.done = False

    def mark_done(self, grad: Tensor) -> None:
        self.done = True


class MABN2d(nn.Module):
    r"""Moving Average Batch Normalization over a 4-D input ``(N, C, H, W)``.

    Training mode, per channel, with ``t`` the number of training-mode calls so far
    (1 at the first) and ``m = buffer_size``:

    .. math::

        \chi^2_B = \mathrm{mean}_{N,H,W}(x^2), \qquad
        \mathrm{var} = \begin{cases} \chi^2_B & t \le m \text{ or } t < \text{warmup} \\
                       \tfrac1m \sum_{i<m} \chi^2_{t-i} & \text{otherwise} \end{cases}

        z = x / \sqrt{\mathrm{var} + \epsilon}, \quad
        r = \mathrm{clamp}\Big(\sqrt{\tfrac{\mathrm{var}+\epsilon}{\mathrm{running}+\epsilon}},
            \tfrac1{\text{clip}}, \text{clip}\Big), \quad y = \gamma\, r\, z + \beta

    with ``r = 1`` while ``t <= max(renorm_start_iter, warmup_iters)``; then
    ``running <- (1 - momentum) * running + momentum * var``. The backward pass replaces the
    batch statistic ``psi_B = mean(g * z)`` (``g = dy * gamma * r``) by its moving average
    under the same rule: ``dx = (g - z * psi) / sqrt(var + eps)``.

    Eval mode is the per-channel affine ``y = gamma * x / sqrt(running + eps) + beta``,
    which :func:`mabn_d2.fuse_mabn` folds into the preceding convolution.

    With ``momentum=None`` the running second moment is the cumulative average of ``var``
    over all steps (as ``nn.BatchNorm2d``'s ``momentum=None``).

    Statistics (``running_second_moment``, ``chi2_buffer``, ``psi_buffer``) are float32
    whatever the input dtype (float64 for float64 inputs and after ``.double()``); ``.half()``
    and ``.to(torch.bfloat16)`` convert the parameters but keep the statistics in float32. A
    step whose statistics are not finite leaves the moving-average buffers and running
    statistics as they were. Empty inputs (``N * H * W == 0``) return an empty output and
    change nothing.

    ``t`` counts training-mode calls. A layer called several times per training step (a head
    shared across FPN levels, as RetinaNet's) therefore counts each call: its
    ``buffer_size``, ``warmup_iters`` and ``renorm_start_iter`` are in calls, and its moving
    averages mix the inputs it is shared between; the layer warns once when it runs again
    before the backward of its previous call. A training-mode call without autograd
    (``torch.no_grad()``) is a step too: ``t`` advances and ``chi2_B`` enters its slot and the
    running second moment, but no backward writes that step's ``psi`` slot, which keeps the
    value written ``m`` steps earlier. Passes that should leave the statistics alone belong in
    eval mode. Double backward (``create_graph=True``, then a second gradient) through a
    training-mode call raises an error; eval mode is differentiable to any order.

    Args:
        num_features: ``C``.
        eps: added to the second moment for numerical stability.
        momentum: weight of the newest value in the running second moment (PyTorch's
            convention: 0.02 equals the paper's history weight 0.98), or None.
        buffer_size: ``m``, the number of recent batch statistics averaged.
        warmup_iters: use batch statistics while ``t < warmup_iters``.
        renorm_start_iter: apply batch renormalisation only after this many iterations.
        renorm_clip: ``r`` is clipped to ``[1 / renorm_clip, renorm_clip]``.
        backward_moving_average: the backward pass uses the moving average of ``psi`` (the
            paper). False uses this batch's ``psi_B`` (the paper's ablation); the forward
            statistics and the buffers are the same either way.
        centralize_weights: a detectron2 ``Conv2d`` built with this layer as its ``norm``
            uses centralized weights (``w - mean(w)`` per output channel, see
            :class:`mabn_d2.CentralizedConv2d`). No effect on the layer's own computation.
        sync: take the batch statistics (``chi2_B``, ``psi_B``) over all processes of
            ``process_group`` like ``nn.SyncBatchNorm``, instead of per process (the paper's
            per-GPU setting, the default). Without an initialised multi-process group it
            behaves exactly as ``sync=False``. In sync mode every process must run each step,
            an empty local input included (it contributes a zero count).
        process_group: the group for ``sync`` (default: the whole world).

    Valid ranges: :data:`mabn_d2.layer.settings.SETTINGS`; a bad value raises ValueError
    naming the argument.

    Attributes:
        name: the layer's qualified name in its model, used in messages ("" if unknown; set by
            mabn_d2 when detectron2 builds a model).
        converted_from: for a layer filled from another normalization by conversion or
            checkpoint loading, where its parameters came from (one of
            ``mabn_d2.finetune.convert.SOURCE_*``); None otherwise. Read by calibration.

    Shape:
        input ``(N, C, H, W)``; output: same shape and dtype.

    Buffers (all saved in the state dict):
        ``running_second_moment (C,)``, ``chi2_buffer (m, C)``, ``psi_buffer (m, C)``,
        ``num_batches_tracked ()`` (``t``).
    """

    _version = 1
    _STATISTICS = ("running_second_moment", "chi2_buffer", "psi_buffer")

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.02,
        buffer_size: int = 16,
        warmup_iters: int = 100,
        renorm_start_iter: int = 1000,
        renorm_clip: float = 5.0,
        backward_moving_average: bool = True,
        centralize_weights: bool = True,
        sync: bool = False,
        process_group: object | None = None,
    ) -> None:
        super().__init__()
        if isinstance(num_features, bool) or not isinstance(num_features, numbers.Integral) \
                or num_features < 1:
            raise ValueError(f"MABN2d: num_features must be an integer >= 1, got "
                             f"{num_features!r}")
        self.num_features = int(num_features)
        self.eps: float = check_setting("eps", eps)
        self.momentum: float | None = check_setting("momentum", momentum)
        self.buffer_size: int = check_setting("buffer_size", buffer_size)
        self.warmup_iters: int = check_setting("warmup_iters", warmup_iters)
        self.renorm_start_iter: int = check_setting("renorm_start_iter", renorm_start_iter)
        self.renorm_clip: float = check_setting("renorm_clip", renorm_clip)
        self.backward_moving_average: bool = check_setting("backward_moving_average",
                                                           backward_moving_average)
        self.centralize_weights: bool = check_setting("centralize_weights", centralize_weights)
        self.sync: bool = check_setting("sync", sync)
        self.process_group = process_group
        self.name = ""
        self.converted_from: str | None = None
        c, m = self.num_features, self.buffer_size
        self.weight = nn.Parameter(torch.ones(c))
        self.bias = nn.Parameter(torch.zeros(c))
        self.register_buffer("running_second_moment", torch.ones(c))
        self.register_buffer("chi2_buffer", torch.zeros(m, c))
        self.register_buffer("psi_buffer", torch.zeros(m, c))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        # Host copy of num_batches_tracked: the step schedule is decided without a sync.
        self._iteration = 0
        # The last training call whose backward has not run yet (see _note_training_call).
        self._awaiting_backward: weakref.ref[_BackwardToken] | None = None
        self._warned_repeated_use = False

    @property
    def iteration(self) -> int:
        """``t``: the number of training steps taken (host value, no device sync).

        Assigning it (an integer >= 0) moves the layer's schedule to that step, e.g. to a
        late step whose moving averages and renorm are on (calibration, benchmarks); it also
        sets ``num_batches_tracked``."""
        return self._iteration

    @iteration.setter
    def iteration(self, t: int) -> None:
        if isinstance(t, bool) or not isinstance(t, numbers.Integral) or t < 0:
            raise ValueError(f"{self._describe()}: iteration must be an integer >= 0, got {t!r}")
        self._iteration = int(t)
        self.num_batches_tracked.fill_(self._iteration)

    def reset_running_stats(self) -> None:
        """Forget all statistics: running second moment 1, buffers 0, ``t = 0``."""
        self.running_second_moment.fill_(1.0)
        self.chi2_buffer.zero_()
        self.psi_buffer.zero_()
        self.num_batches_tracked.zero_()
        self._iteration = 0

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> MABN2d:
        # .half() / .to(bfloat16) convert every floating tensor; the statistics stay in their
        # statistics dtype (float32), converted from the values they had, not from a rounded
        # half copy (E[x^2] overflows float16 for inputs around 256).
        before = {name: self._buffers[name] for name in self._STATISTICS}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            wanted = statistics_dtype(new.dtype)
            if new.dtype != wanted:
                self._buffers[name] = old.to(device=new.device, dtype=wanted)
        return self

    def _check_input(self, x: Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(
                f"{self._describe()}: expected a 4-D input (N, {self.num_features}, H, W), "
                f"got shape {tuple(x.shape)}"
            )
        if x.shape[1] != self.num_features:
            raise ValueError(
                f"{self._describe()}: expected {self.num_features} channels, input "
                f"(N, {self.num_features}, H, W), got shape {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise TypeError(
                f"{self._describe()}: expected a floating-point input (N, "
                f"{self.num_features}, H, W), got dtype {x.dtype}"
            )

    def _describe(self) -> str:
        return f"MABN2d({self.num_features})" + (f" '{self.name}'" if self.name else "")

    def _next_step(self) -> MABNStep:
        t = self._iteration + 1
        use_batch_stats = t <= self.buffer_size or t < self.warmup_iters
        return MABNStep(
            slot=t % self.buffer_size,
            use_batch_stats=use_batch_stats,
            backward_batch_stats=use_batch_stats or not self.backward_moving_average,
            renorm=t > max(self.renorm_start_iter, self.warmup_iters),
            renorm_clip=self.renorm_clip,
            # momentum=None: cumulative average, the newest of t values weighs 1/t.
            momentum=self.momentum if self.momentum is not None else 1.0 / t,
            eps=self.eps,
        )

    def _sync_group(self) -> object | None:
        """The process group to synchronise statistics over, or None for per-process."""
        if not (self.sync and dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        if self.training:
            return self._train_step(x)
        if x.numel() == 0:
            return self._empty_output(x)
        return mabn_eval(x, self.weight, self.bias, self.running_second_moment, self.eps)

    def _empty_output(self, x: Tensor) -> Tensor:
        # Zero RoIs etc.: keep the graph (zero gradients) and leave all state untouched.
        return x * self.weight.view(1, -1, 1, 1).to(x.dtype) + self.bias.view(1, -1, 1, 1).to(
            x.dtype
        )

    # torch.compile runs the training step eagerly (a graph break around it): its schedule
    # is host state that changes every step, which would recompile the graph at each one.
    @torch.compiler.disable
    def _train_step(self, x: Tensor) -> Tensor:
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"{self._describe()}: a training step cannot be captured in a CUDA graph: its "
                "schedule (buffer slot, batch or moving-average statistics, renorm) is decided "
                "on the host at every step, so a replayed graph would repeat the captured "
                "step's schedule. Capture the model in eval mode (or after mabn_d2.fuse_mabn), "
                "and run training steps eagerly."
            )
        group = self._sync_group()
        if x.numel() == 0 and group is None:
            return self._empty_output(x)
        step = self._next_step()
        y, finite = mabn_train(
            x.contiguous(),
            self.weight,
            self.bias,
            self.running_second_moment,
            self.chi2_buffer,
            self.psi_buffer,
            step,
            process_group=group,
        )
        self._iteration += 1
        self.num_batches_tracked.add_(1)
        self._note_training_call(y)
        if finite.device.type == "cpu" and not bool(finite):
            # Free to check on the CPU only; on a GPU this would force a sync.
            logger.warning(
                "%s: non-finite batch statistics at iteration %d; moving averages and running "
                "statistics kept as they were",
                self._describe(),
                self._iteration,
            )
        return y

    def __getstate__(self) -> dict[str, Any]:
        # A weak reference cannot be pickled (torch.save(model), copies to other processes);
        # it only concerns a call in progress.
        state = self.__dict__.copy()
        state["_awaiting_backward"] = None
        return state

    def _note_training_call(self, y: Tensor) -> None:
        """Warn (once) when this layer runs again before the backward of its previous training
        call: it is used several times per training step, and its schedule counts calls."""
        previous = self._awaiting_backward() if self._awaiting_backward is not None else None
        if previous is not None and not previous.done and not self._warned_repeated_use:
            self._warned_repeated_use = True
            message = (
                f"{self._describe()} ran again before the backward of its previous call: it is "
                "used several times per training step (e.g. a head shared across FPN levels, "
                "as RetinaNet's). Its step count t advances per call, so buffer_size, "
                "warmup_iters and renorm_start_iter (MODEL.MABN.BUFFER_SIZE, WARMUP_ITERS, "
                "RENORM_START_ITER) count calls, not training steps, and its moving averages "
                "mix the statistics of the inputs it is shared between. Multiply these "
                "settings by the calls per step, or give each use its own norm layer."
            )
            logger.warning(message)
            warnings.warn(message, RuntimeWarning, stacklevel=3)
        if not y.requires_grad:  # no backward will come (no_grad, frozen layer and input)
            self._awaiting_backward = None
            return
        token = _BackwardToken()
        # The hook lives as long as y's graph: a call whose graph was freed without a
        # backward (its output dropped) leaves a dead reference, not a pending call.
        y.register_hook(token.mark_done)
        self._awaiting_backward = weakref.ref(token)

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        for name in ("chi2_buffer", "psi_buffer"):
            saved = state_dict.get(prefix + name)
            if saved is not None and saved.shape != getattr(self, name).shape:
                error_msgs.append(
                    f"{prefix}{name}: checkpoint has buffer_size {saved.shape[0]} and "
                    f"{saved.shape[1] if saved.dim() == 2 else '?'} channels, this "
                    f"{self._describe()} has buffer_size {self.buffer_size}. Set "
                    f"MODEL.MABN.BUFFER_SIZE (or buffer_size=) to {saved.shape[0]} to resume "
                    "that run, or remove the chi2_buffer/psi_buffer/num_batches_tracked "
                    "entries from the checkpoint to restart the moving averages."
                )
                # Load the layer's own buffer in its place: the error above is the only
                # message (removing the entry made PyTorch add a wrong "Missing key(s)").
                state_dict = {**state_dict, prefix + name: getattr(self, name)}
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
            error_msgs,
        )
        if prefix + "num_batches_tracked" in state_dict:
            self._iteration = int(self.num_batches_tracked.item())

    def extra_repr(self) -> str:
        defaults = {setting.name: setting.default for setting in SETTINGS}
        changed = [f"{name}={getattr(self, name)}" for name in
                   ("backward_moving_average", "centralize_weights", "sync")
                   if getattr(self, name) != defaults[name]]
        return ", ".join([
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}",
            f"buffer_size={self.buffer_size}, warmup_iters={self.warmup_iters}",
            f"renorm_start_iter={self.renorm_start_iter}, renorm_clip={self.renorm_clip}",
            *changed,
        ])
