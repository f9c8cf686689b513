"""``MABN2d``: Moving Average Batch Normalization for ``(N, C, H, W)`` inputs."""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .functional import MABNStep, mabn_eval, mabn_train

__all__ = ["MABN2d"]

logger = logging.getLogger(__name__)


def _check_hyperparameters(
    num_features: int,
    eps: float,
    momentum: float,
    buffer_size: int,
    warmup_iters: int,
    renorm_start_iter: int,
    renorm_clip: float,
) -> None:
    checks = [
        (isinstance(num_features, int) and num_features >= 1, "num_features", num_features,
         "an int >= 1"),
        (eps >= 0, "eps", eps, ">= 0"),
        (0 < momentum <= 1, "momentum", momentum, "in (0, 1]"),
        (isinstance(buffer_size, int) and buffer_size >= 1, "buffer_size", buffer_size,
         "an int >= 1"),
        (isinstance(warmup_iters, int) and warmup_iters >= 0, "warmup_iters", warmup_iters,
         "an int >= 0"),
        (isinstance(renorm_start_iter, int) and renorm_start_iter >= 0, "renorm_start_iter",
         renorm_start_iter, "an int >= 0"),
        (renorm_clip >= 1, "renorm_clip", renorm_clip, ">= 1"),
    ]
    for ok, name, value, expected in checks:
        if not ok:
            raise ValueError(f"MABN2d: {name} must be {expected}, got {value!r}")


class MABN2d(nn.Module):
    r"""Moving Average Batch Normalization over a 4-D input ``(N, C, H, W)``.

    Training mode, per channel, with ``t`` the number of training forward calls so far
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

    Statistics are float32 (float64 for float64 inputs) whatever the input dtype. A step
    whose statistics are not finite leaves the moving-average buffers and running statistics
    as they were. Empty inputs (``N * H * W == 0``) return an empty output and change nothing.

    Args:
        num_features: ``C``.
        eps: added to the second moment for numerical stability.
        momentum: weight of the newest value in the running second moment (PyTorch's
            convention: 0.02 equals the paper's history weight 0.98).
        buffer_size: ``m``, the number of recent batch statistics averaged.
        warmup_iters: use batch statistics while ``t < warmup_iters``.
        renorm_start_iter: apply batch renormalisation only after this many iterations.
        renorm_clip: ``r`` is clipped to ``[1 / renorm_clip, renorm_clip]``.
        sync: take the batch statistics (``chi2_B``, ``psi_B``) over all processes of
            ``process_group`` like ``nn.SyncBatchNorm``, instead of per process (the paper's
            per-GPU setting, the default). Without an initialised multi-process group it
            behaves exactly as ``sync=False``. In sync mode every process must run each step,
            an empty local input included (it contributes a zero count).
        process_group: the group for ``sync`` (default: the whole world).

    Shape:
        input ``(N, C, H, W)``; output: same shape and dtype.

    Buffers (all saved in the state dict):
        ``running_second_moment (C,)``, ``chi2_buffer (m, C)``, ``psi_buffer (m, C)``,
        ``num_batches_tracked ()`` (``t``).
    """

    _version = 1

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float = 0.02,
        buffer_size: int = 16,
        warmup_iters: int = 100,
        renorm_start_iter: int = 1000,
        renorm_clip: float = 5.0,
        sync: bool = False,
        process_group: object | None = None,
    ) -> None:
        super().__init__()
        _check_hyperparameters(
            num_features, eps, momentum, buffer_size, warmup_iters, renorm_start_iter,
            renorm_clip,
        )
        self.num_features = num_features
        self.eps = float(eps)
        self.momentum = float(momentum)
        self.buffer_size = buffer_size
        self.warmup_iters = warmup_iters
        self.renorm_start_iter = renorm_start_iter
        self.renorm_clip = float(renorm_clip)
        self.sync = bool(sync)
        self.process_group = process_group
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_second_moment", torch.ones(num_features))
        self.register_buffer("chi2_buffer", torch.zeros(buffer_size, num_features))
        self.register_buffer("psi_buffer", torch.zeros(buffer_size, num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        # Host copy of num_batches_tracked: the step schedule is decided without a sync.
        self._iteration = 0

    @property
    def iteration(self) -> int:
        """``t``: the number of training steps taken (host value, no device sync)."""
        return self._iteration

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
        name = getattr(self, "_mabn_name", "")
        return f"MABN2d({self.num_features})" + (f" '{name}'" if name else "")

    def _next_step(self) -> MABNStep:
        t = self._iteration + 1
        return MABNStep(
            slot=t % self.buffer_size,
            use_batch_stats=t <= self.buffer_size or t < self.warmup_iters,
            renorm=t > max(self.renorm_start_iter, self.warmup_iters),
            renorm_clip=self.renorm_clip,
            momentum=self.momentum,
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
        group = self._sync_group() if self.training else None
        if x.numel() == 0 and group is None:
            # Zero RoIs etc.: keep the graph (zero gradients) and leave all state untouched.
            return x * self.weight.view(1, -1, 1, 1).to(x.dtype) + self.bias.view(
                1, -1, 1, 1
            ).to(x.dtype)
        if not self.training:
            return mabn_eval(x, self.weight, self.bias, self.running_second_moment, self.eps)
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
        if finite.device.type == "cpu" and not bool(finite):
            # Free to check on the CPU only; on a GPU this would force a sync.
            logger.warning(
                "%s: non-finite batch statistics at iteration %d; moving averages and running "
                "statistics kept as they were",
                self._describe(),
                self._iteration,
            )
        return y

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
                state_dict = {k: v for k, v in state_dict.items() if k != prefix + name}
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
            error_msgs,
        )
        if prefix + "num_batches_tracked" in state_dict:
            self._iteration = int(self.num_batches_tracked.item())

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"buffer_size={self.buffer_size}, warmup_iters={self.warmup_iters}, "
            f"renorm_start_iter={self.renorm_start_iter}, renorm_clip={self.renorm_clip}"
            + (", sync=True" if self.sync else "")
        )
