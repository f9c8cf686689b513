#!/usr/bin/env python
"""The paper's small-batch claim in miniature: normalization over groups of 2 inside an SGD
batch of 32, on real data (scikit-learn's handwritten digits, 1,797 8x8 images, shipped with
scikit-learn, no download).

Compared (the paper's ImageNet Table, scaled down): BN/32, BN/2, Batch Renorm/2, GN, MABN/2,
and the MABN ablations "without the backward moving average" and "without weight
centralization". For each seed, every method trains the same small ResNet from the same
initialization on the same stratified 80/20 train/test split (split and initialization change
with the seed); the test error (eval mode: running statistics) is reported as mean +- std
over seeds, next to the last epoch's training loss.

Group protocol ("BN/2" etc.): each norm layer splits the SGD batch into consecutive groups of
2 samples and normalizes them one after the other, as consecutive calls of one layer. Each
group is one normalization batch, as for a layer on one GPU that holds 2 images; the
layer's state (running statistics, MABN's moving-average buffers and step counter) advances
once per group, so a layer sees 16 normalization batches per SGD step, and MABN's simple
moving average over ``m = 16`` batch statistics spans the previous 16 groups of 2 (32
samples), across the SGD-step boundary. This is how the authors' ImageNet MABN code splits
a GPU's batch into groups of 2. Parameters are shared by all groups; the gradient of a step is
the sum over groups. Step-based MABN settings are given in SGD iterations and multiplied by
the number of groups per step for the layer.

Usage::

    python studies/small_batch_study.py                 # default: < 15 min on 2 CPU cores
    python studies/small_batch_study.py --full          # 5 seeds, 30 epochs, 2 blocks per stage
    python studies/small_batch_study.py --methods BN/32 MABN/2 --seeds 1 --epochs 2

Writes ``<out>/small_batch_study.json``, ``<out>/small_batch_study.png`` and
``<out>/batch_stats_study.png`` (batch statistics of one layer, seed 0).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import runpy
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mabn_d2 import MABN2d
from mabn_d2.integration.batch_stats import BatchStatsRecorder, to_scalars
from mabn_d2.layer.centralization import centralize_weight

# ---------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------


@dataclass
class Split:
    x_train: Tensor  # (N, 1, 8, 8) float32, standardized
    y_train: Tensor  # (N,) int64
    x_test: Tensor
    y_test: Tensor


def load_digits_split(test_fraction: float = 0.2, split_seed: int = 0) -> Split:
    """scikit-learn's digits, a stratified train/test split drawn with ``split_seed``,
    standardized with the training set's mean and std."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images.astype(np.float32)[:, None]  # (1797, 1, 8, 8), values 0..16
    x_tr, x_te, y_tr, y_te = train_test_split(
        images, digits.target, test_size=test_fraction, random_state=split_seed,
        stratify=digits.target,
    )
    mean, std = x_tr.mean(), x_tr.std()
    return Split(
        torch.from_numpy((x_tr - mean) / std), torch.from_numpy(y_tr).long(),
        torch.from_numpy((x_te - mean) / std), torch.from_numpy(y_te).long(),
    )


def random_shift(x: Tensor, generator: torch.Generator, max_shift: int = 1) -> Tensor:
    """Translate each image by an integer offset in ``[-max_shift, max_shift]^2`` (zero fill)."""
    n, _, h, w = x.shape
    padded = F.pad(x, [max_shift] * 4)
    offsets = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=generator)
    rows = (offsets[:, 0, None] + torch.arange(h)).view(n, 1, h, 1).expand(n, 1, h, w)
    cols = (offsets[:, 1, None] + torch.arange(w)).view(n, 1, 1, w).expand(n, 1, h, w)
    flat = padded.flatten(2)
    index = (rows * (w + 2 * max_shift) + cols).flatten(2)
    return flat.gather(2, index).view(n, 1, h, w)


# ---------------------------------------------------------------------------------------
# Normalization layers
# ---------------------------------------------------------------------------------------


class BatchRenorm2d(nn.Module):
    r"""Batch Renormalization (Ioffe, NeurIPS 2017) over ``(N, C, H, W)``.

    Training, per channel: ``mu_B``, ``sigma_B = sqrt(var_B + eps)`` of the batch;
    ``r = clip(sigma_B / sigma, 1/r_max, r_max)``, ``d = clip((mu_B - mu) / sigma, -d_max,
    d_max)`` (both treated as constants in backward); ``y = gamma * ((x - mu_B) / sigma_B * r
    + d) + beta``; then ``mu``, ``sigma`` move towards ``mu_B``, ``sigma_B`` by ``momentum``.
    ``r_max``/``d_max`` are 1/0 (plain BN) for the first ``warmup_iters`` calls and then grow
    linearly to ``r_max``/``d_max`` over ``relax_iters`` calls, as in the paper. Eval: ``y =
    gamma * (x - mu) / sigma + beta``.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float = 0.01,
        r_max: float = 3.0,
        d_max: float = 5.0,
        warmup_iters: int = 0,
        relax_iters: int = 1,
    ) -> None:
        super().__init__()
        if r_max < 1 or d_max < 0 or not 0 < momentum <= 1 or relax_iters < 1:
            raise ValueError("BatchRenorm2d: need r_max >= 1, d_max >= 0, 0 < momentum <= 1, "
                             "relax_iters >= 1")
        self.eps, self.momentum = eps, momentum
        self.r_max, self.d_max = r_max, d_max
        self.warmup_iters, self.relax_iters = warmup_iters, relax_iters
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_std", torch.ones(num_features))
        self.iteration = 0

    def clip_limits(self) -> tuple[float, float]:
        """``(r_max, d_max)`` in force at the next call (``self.iteration`` calls so far)."""
        progress = min(max(self.iteration + 1 - self.warmup_iters, 0) / self.relax_iters, 1.0)
        return 1.0 + (self.r_max - 1.0) * progress, self.d_max * progress

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return F.batch_norm(x, self.running_mean, self.running_std.square(), self.weight,
                                self.bias, training=False, eps=0.0)
        with torch.no_grad():
            mu, var = torch.batch_norm_update_stats(x, None, None, 0.0)
            std = (var + self.eps).sqrt()
            r_max, d_max = self.clip_limits()
            r = (std / self.running_std).clamp(1.0 / r_max, r_max)
            d = ((mu - self.running_mean) / self.running_std).clamp(-d_max, d_max)
            self.running_mean.lerp_(mu, self.momentum)
            self.running_std.lerp_(std, self.momentum)
        self.iteration += 1
        # gamma * (x_hat * r + d) + beta is batch norm with weight gamma * r and bias
        # beta + gamma * d; r and d are constants, the batch statistics are differentiated.
        return F.batch_norm(x, None, None, self.weight * r, self.bias + self.weight * d,
                            training=True, eps=self.eps)


class GroupSplitNorm(nn.Module):
    """Normalize a batch as consecutive groups of ``group_size`` samples with one ``layer``
    (see the module docstring: each group is one normalization batch of the layer). Eval
    mode, where the layers use fixed statistics, applies ``layer`` to the whole batch."""

    def __init__(self, layer: nn.Module, group_size: int) -> None:
        super().__init__()
        if group_size < 1:
            raise ValueError(f"GroupSplitNorm: group_size must be >= 1, got {group_size}")
        self.layer = layer
        self.group_size = group_size

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or x.shape[0] <= self.group_size:
            return self.layer(x)
        if x.shape[0] % self.group_size:
            raise ValueError(
                f"GroupSplitNorm: batch of {x.shape[0]} is not a multiple of the group size "
                f"{self.group_size}"
            )
        return torch.cat([self.layer(g) for g in x.split(self.group_size)])


# ---------------------------------------------------------------------------------------
# Methods and model
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    """One normalization setting of the study."""

    name: str
    norm: str  # "BN", "BRN", "GN", "MABN", "MABN-batch-psi"
    group_size: int  # normalization batch; 0: per-sample norm (GN)
    centralize: bool = False  # weight centralization of the convs feeding the norm


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("BN/32", "BN", 32),
        Method("BN/2", "BN", 2),
        Method("BRN/2", "BRN", 2),
        Method("GN", "GN", 0),
        Method("MABN/2", "MABN", 2, centralize=True),
        Method("MABN/2 w/o backward MA", "MABN-batch-psi", 2, centralize=True),
        Method("MABN/2 w/o centralization", "MABN", 2, centralize=False),
    )
}


@dataclass(frozen=True)
class StudyConfig:
    """Training protocol shared by all methods."""

    epochs: int = 10
    batch_size: int = 32
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    widths: tuple[int, ...] = (16, 32, 64)
    blocks: tuple[int, ...] = (1, 1, 1)
    gn_groups: int = 8
    bn_momentum: float = 0.1
    # MABN and BRN schedules, in SGD iterations (the layers count groups: x groups per step).
    # One epoch is 44 iterations: batch statistics for about the first epoch, renorm from
    # the third (mabn_d2's defaults for detection: 100 and 1000).
    mabn_warmup_iters: int = 50
    mabn_renorm_start_iter: int = 100
    mabn_buffer_size: int = 16
    mabn_momentum: float = 0.02
    brn_warmup_iters: int = 50
    brn_relax_iters: int = 150


def make_norm(method: Method, channels: int, cfg: StudyConfig) -> nn.Module:
    """The norm layer of ``method`` for ``channels``, wrapped in its group split."""
    groups_per_step = cfg.batch_size // method.group_size if method.group_size else 1
    if method.norm == "GN":
        return nn.GroupNorm(min(cfg.gn_groups, channels), channels)
    if method.norm == "BN":
        layer: nn.Module = nn.BatchNorm2d(channels, momentum=cfg.bn_momentum)
    elif method.norm == "BRN":
        layer = BatchRenorm2d(
            channels, momentum=cfg.bn_momentum,
            warmup_iters=cfg.brn_warmup_iters * groups_per_step,
            relax_iters=cfg.brn_relax_iters * groups_per_step,
        )
    elif method.norm in ("MABN", "MABN-batch-psi"):
        layer = MABN2d(
            channels,
            backward_moving_average=method.norm == "MABN",
            momentum=cfg.mabn_momentum,
            buffer_size=cfg.mabn_buffer_size,
            warmup_iters=cfg.mabn_warmup_iters * groups_per_step,
            renorm_start_iter=cfg.mabn_renorm_start_iter * groups_per_step,
        )
    else:
        raise ValueError(f"unknown norm {method.norm!r}")
    return GroupSplitNorm(layer, method.group_size)


class ConvNorm(nn.Module):
    """3x3 (or 1x1) convolution without bias, then the norm; optionally on the centralized
    weight (:func:`mabn_d2.layer.centralization.centralize_weight`), as MABN prescribes."""

    def __init__(self, c_in: int, c_out: int, stride: int, kernel: int, norm: nn.Module,
                 centralize: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False)
        self.norm = norm
        self.centralize = centralize

    def forward(self, x: Tensor) -> Tensor:
        weight = centralize_weight(self.conv.weight) if self.centralize else self.conv.weight
        return self.norm(F.conv2d(x, weight, None, self.conv.stride, self.conv.padding))


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, norm: Callable[[int], nn.Module],
                 centralize: bool) -> None:
        super().__init__()
        self.conv1 = ConvNorm(c_in, c_out, stride, 3, norm(c_out), centralize)
        self.conv2 = ConvNorm(c_out, c_out, 1, 3, norm(c_out), centralize)
        self.shortcut = (
            ConvNorm(c_in, c_out, stride, 1, norm(c_out), centralize)
            if stride != 1 or c_in != c_out else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.conv2(F.relu(self.conv1(x))) + self.shortcut(x))


class SmallResNet(nn.Module):
    """ResNet for 8x8 inputs: stem 3x3 conv, stages of basic blocks (strides 1, 2, 2, ...:
    8x8 -> 4x4 -> 2x2), global average pooling, linear classifier. Every conv is followed by
    the method's norm layer."""

    def __init__(self, method: Method, cfg: StudyConfig, num_classes: int = 10) -> None:
        super().__init__()
        def norm(c: int) -> nn.Module:
            return make_norm(method, c, cfg)

        c0 = cfg.widths[0]
        self.stem = ConvNorm(1, c0, 1, 3, norm(c0), method.centralize)
        stages, c_in = [], c0
        for i, (width, n_blocks) in enumerate(zip(cfg.widths, cfg.blocks)):
            blocks = []
            for j in range(n_blocks):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(BasicBlock(c_in, width, stride, norm, method.centralize))
                c_in = width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stages(F.relu(self.stem(x)))
        return self.fc(x.mean(dim=(2, 3)))


# ---------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------

# The layer whose batch statistics are recorded (first conv of the second stage), and the
# methods recorded (seed 0): batch 32 against batch 2, BN against MABN, as in the paper.
RECORDED_LAYER = "stages.1.0.conv1.norm.layer"
RECORDED_METHODS = ("BN/32", "BN/2", "MABN/2")


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor) -> tuple[float, float]:
    """``(top-1 error %, mean cross-entropy)`` in eval mode (running statistics)."""
    model.eval()
    logits = torch.cat([model(xb) for xb in x.split(256)])
    error = 100.0 * float((logits.argmax(1) != y).float().mean())
    return error, float(F.cross_entropy(logits, y))


def train_one(
    method: Method,
    seed: int,
    data: Split,
    cfg: StudyConfig,
    record_every: int = 0,
    log: Callable[[str], None] = lambda s: None,
) -> dict:
    """Train ``method`` with ``seed``. Returns the test error (%) and loss, the last epoch's
    training loss, error and loss on the training images in eval mode, seconds and, when
    ``record_every`` > 0, the batch statistics of :data:`RECORDED_LAYER` (GN: the
    corresponding GroupNorm) every ``record_every`` iterations."""
    torch.manual_seed(seed)
    model = SmallResNet(method, cfg)
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = len(data.y_train) // cfg.batch_size  # drop the last partial batch
    total = cfg.epochs * steps_per_epoch
    decay, no_decay = [], []
    for p in model.parameters():
        (no_decay if p.dim() == 1 else decay).append(p)
    optimizer = torch.optim.SGD(
        [{"params": decay, "weight_decay": cfg.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, momentum=cfg.momentum,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: 0.5 * (1 + math.cos(math.pi * it / total))
    )
    recorder = None
    if record_every:
        layer_name = RECORDED_LAYER if method.norm != "GN" else RECORDED_LAYER[: -len(".layer")]
        recorder = BatchStatsRecorder({layer_name: model.get_submodule(layer_name)})
    records, losses = [], []
    start = time.perf_counter()
    it = 0
    for epoch in range(cfg.epochs):
        model.train()
        order = torch.randperm(len(data.y_train), generator=generator)
        for k in range(steps_per_epoch):
            idx = order[k * cfg.batch_size:(k + 1) * cfg.batch_size]
            xb = random_shift(data.x_train[idx], generator)
            if recorder is not None and it % record_every == 0:
                recorder.arm()
            loss = F.cross_entropy(model(xb), data.y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            if recorder is not None and recorder.armed:
                scalars = to_scalars(recorder.collect(), channels=[0])
                records.append({"iteration": it, **{k.split("/")[-2]: v
                                                    for k, v in scalars.items()}})
            losses.append(loss.item())
            it += 1
        if not math.isfinite(losses[-1]):
            log(f"  {method.name} seed {seed}: loss diverged at epoch {epoch}")
            break
    seconds = time.perf_counter() - start
    if recorder is not None:
        recorder.remove()
    error, nll = evaluate(model, data.x_test, data.y_test)
    # The training images without augmentation, eval mode: fit with inference statistics.
    train_error, train_nll = evaluate(model, data.x_train, data.y_train)
    last = losses[-steps_per_epoch:]
    return {
        "method": method.name,
        "seed": seed,
        "test_error": error,
        "test_loss": nll,
        "final_train_loss": float(np.mean(last)),
        "train_error_eval_mode": train_error,
        "train_loss_eval_mode": train_nll,
        "train_seconds": seconds,
        "iterations": it,
        "batch_stats": records,
    }


# ---------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------


REFERENCE = "BN/32"


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample std (0 for one value); NaN (a diverged run) propagates."""
    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return float(np.mean(values)), std


def summarize(runs: Sequence[dict], methods: Sequence[str]) -> list[dict]:
    """Per method: mean and std over seeds, and the paired difference of the test error to
    :data:`REFERENCE` (same seed: same split and initialization) with its standard error."""
    by_seed = {(r["method"], r["seed"]): r for r in runs}
    rows = []
    for name in methods:
        mine = [r for r in runs if r["method"] == name]
        if not mine:
            continue
        row: dict = {"method": name, "seeds": len(mine),
                     "errors": [r["test_error"] for r in mine]}
        for key in ("test_error", "test_loss", "final_train_loss", "train_loss_eval_mode"):
            row[key + "_mean"], row[key + "_std"] = _mean_std([r[key] for r in mine])
        diffs = [r["test_error"] - by_seed[(REFERENCE, r["seed"])]["test_error"]
                 for r in mine if (REFERENCE, r["seed"]) in by_seed]
        if name != REFERENCE and diffs:
            mean, std = _mean_std(diffs)
            row["paired_error_diff_mean"] = mean
            row["paired_error_diff_se"] = std / math.sqrt(len(diffs))
            row["paired_seeds_worse"] = sum(d > 0 for d in diffs)
        rows.append(row)
    return rows


def format_table(rows: Sequence[dict]) -> str:
    lines = [
        f"| method | test error % | vs {REFERENCE}: paired diff ± s.e. (seeds worse) "
        "| test loss | training loss, last epoch | seeds |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        paired = "—"
        if "paired_error_diff_mean" in r:
            paired = (f"{r['paired_error_diff_mean']:+.2f} ± {r['paired_error_diff_se']:.2f} "
                      f"({r['paired_seeds_worse']}/{r['seeds']})")
        lines.append(
            f"| {r['method']} | {r['test_error_mean']:.2f} ± {r['test_error_std']:.2f} | "
            f"{paired} | {r['test_loss_mean']:.3f} ± {r['test_loss_std']:.3f} | "
            f"{r['final_train_loss_mean']:.3f} ± {r['final_train_loss_std']:.3f} | "
            f"{r['seeds']} |"
        )
    return "\n".join(lines)


def plot_results(rows: Sequence[dict], runs: Sequence[dict], path: Path, title: str) -> None:
    """Two panels per method: test error (eval mode) and the last epoch's training loss
    (train mode); bars are means over seeds with their std, dots the seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    pos = np.arange(len(rows))
    panels = (("test_error", "test error %"), ("final_train_loss", "training loss, last epoch"))
    for ax, (key, label) in zip(axes, panels):
        per_method = [[r[key] for r in runs if r["method"] == row["method"]] for row in rows]
        stats = [_mean_std(v) for v in per_method]
        ax.barh(pos, [m for m, _ in stats], xerr=[s for _, s in stats],
                color="#9ecae1", edgecolor="#3182bd", capsize=3)
        for p, values in zip(pos, per_method):
            ax.scatter(values, [p] * len(values), color="black", s=8, zorder=3)
        ax.set_xlabel(f"{label} (mean ± std; dots: seeds)")
    axes[0].set_yticks(pos, [r["method"] for r in rows])
    axes[0].invert_yaxis()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_study_batch_stats(json_path: Path, png: Path) -> None:
    """Curves of the recorded layer's four statistics, one per method (seed 0), drawn by
    ``studies/plot_batch_stats.py`` from the study's JSON."""
    # The script beside this one (studies/ is a folder of scripts, not a package).
    plot_batch_stats = runpy.run_path(str(Path(__file__).with_name("plot_batch_stats.py")),
                                      run_name="plot_batch_stats")
    plot_batch_stats["main"](["--study", str(json_path), "--out", str(png)])


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS),
                        metavar="METHOD", help=f"subset of {list(METHODS)}")
    parser.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default 3; "
                        "--full: 5)")
    parser.add_argument("--epochs", type=int, default=None, help="default 10; --full: 30")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--full", action="store_true", help="longer/bigger: 5 seeds, 30 "
                        "epochs, two blocks per stage")
    parser.add_argument("--record-every", type=int, default=10,
                        help="record batch statistics every N iterations (seed 0, methods "
                        f"{', '.join(RECORDED_METHODS)}; 0: off)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=Path("docs/results"))
    args = parser.parse_args(argv)
    for key in ("seeds", "epochs", "threads"):
        value = getattr(args, key)
        if value is not None and value < 1:
            parser.error(f"--{key} must be >= 1, got {value}")
    if args.record_every < 0:
        parser.error(f"--record-every must be >= 0 (0: off), got {args.record_every}")
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        parser.error(f"--lr must be a finite number > 0, got {args.lr}")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = StudyConfig()
    if args.full:
        cfg = replace(cfg, epochs=30, blocks=(2, 2, 2))
    if args.epochs is not None:
        cfg = replace(cfg, epochs=args.epochs)
    if args.lr is not None:
        cfg = replace(cfg, lr=args.lr)
    n_seeds = args.seeds or (5 if args.full else 3)
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"digits: {n_seeds} seeds x {len(args.methods)} methods; {cfg}", flush=True)
    runs, batch_stats = [], {}
    wall = time.perf_counter()
    for seed in range(n_seeds):
        # Seed s: train/test split s and initialization s, the same for every method.
        data = load_digits_split(split_seed=seed)
        for name in args.methods:
            record = args.record_every if seed == 0 and name in RECORDED_METHODS else 0
            run = train_one(METHODS[name], seed, data, cfg, record, log=print)
            if run["batch_stats"]:
                batch_stats[name] = run["batch_stats"]
            del run["batch_stats"]
            runs.append(run)
            print(f"  seed {seed} {name:28s} test error {run['test_error']:5.2f}%  "
                  f"test loss {run['test_loss']:.3f}  train loss {run['final_train_loss']:.3f}  "
                  f"({run['train_seconds']:.0f} s)",
                  flush=True)
    wall = time.perf_counter() - wall
    rows = summarize(runs, args.methods)
    table = format_table(rows)
    print(table)
    print(f"total {wall / 60:.1f} min")
    result = {
        "command": "python studies/small_batch_study.py " + " ".join(
            sys.argv[1:] if argv is None else argv),
        "dataset": "sklearn.datasets.load_digits: 1437 train / 360 test images, stratified "
                   "split drawn with the run's seed",
        "config": asdict(cfg),
        "seeds": n_seeds,
        "summary": rows,
        "runs": runs,
        "batch_stats_layer": RECORDED_LAYER,
        "batch_stats": batch_stats,
        "wall_minutes": wall / 60,
        "torch": torch.__version__,
        "platform": platform.platform(),
        "threads": args.threads,
    }
    json_path = args.out / "small_batch_study.json"
    json_path.write_text(json.dumps(result, indent=1))
    title = (f"digits, SGD batch {cfg.batch_size}, {cfg.epochs} epochs, {n_seeds} seeds "
             "(norm batch after '/')")
    plot_results(rows, runs, args.out / "small_batch_study.png", title)
    if batch_stats:
        plot_study_batch_stats(json_path, args.out / "batch_stats_study.png")
    print(f"wrote {args.out}/small_batch_study.json, .png")
    return result


if __name__ == "__main__":
    main()
