"""Two CPU processes (gloo): per-process MABN statistics, and the synchronised mode."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from mabn_d2 import MABN2d
from mabn_d2.engine.launch import launch

STEPS = 12
LAYER = dict(buffer_size=4, warmup_iters=3, renorm_start_iter=6, renorm_clip=1.5)


def batches(steps: int = STEPS):
    """The same global batches of 2 in every process (fixed seed)."""
    gen = torch.Generator().manual_seed(0)
    for step in range(steps):
        scale = 1.0 + step % 3
        x = torch.randn(2, 3, 5, 4, generator=gen, dtype=torch.float64) * scale + 0.2
        x[1] *= 2.0  # the two images have different statistics
        dy = torch.randn(2, 3, 5, 4, generator=gen, dtype=torch.float64)
        yield x, dy


def run_layer(layer: MABN2d, shard: slice) -> dict[str, torch.Tensor]:
    ys, dxs, dws, dbs = [], [], [], []
    for x, dy in batches():
        x = x[shard].clone().requires_grad_(True)
        y = layer(x)
        y.backward(dy[shard])
        ys.append(y.detach())
        dxs.append(x.grad)
        dws.append(layer.weight.grad.clone())
        dbs.append(layer.bias.grad.clone())
        layer.weight.grad = layer.bias.grad = None
    return {"y": torch.stack(ys), "dx": torch.stack(dxs), "dweight": torch.stack(dws),
            "dbias": torch.stack(dbs), **{k: v.clone() for k, v in layer.state_dict().items()}}


def _worker(out_dir: str, sync: bool) -> None:
    rank = dist.get_rank()
    layer = MABN2d(3, sync=sync, **LAYER).double().train()
    result = run_layer(layer, slice(rank, rank + 1))
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")


def launch_two(tmp_path: Path, sync: bool) -> list[dict[str, torch.Tensor]]:
    launch(_worker, 2, dist_url="auto", args=(str(tmp_path), sync), backend="gloo")
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]


@pytest.mark.e2e  # two processes (gloo)
def test_sync_mode_two_ranks_of_batch_1_equal_one_process_of_batch_2(tmp_path):
    ranks = launch_two(tmp_path, sync=True)
    single = run_layer(MABN2d(3, **LAYER).double().train(), slice(0, 2))
    for key in ("running_second_moment", "chi2_buffer", "psi_buffer", "num_batches_tracked"):
        for rank in ranks:
            torch.testing.assert_close(rank[key], single[key], rtol=1e-10, atol=1e-12)
    for key in ("y", "dx"):  # per image: rank r holds image r of the batch
        merged = torch.cat([ranks[0][key], ranks[1][key]], dim=1)
        torch.testing.assert_close(merged, single[key], rtol=1e-10, atol=1e-12)
    for key in ("dweight", "dbias"):  # parameter gradients add up over the ranks (DDP sums)
        torch.testing.assert_close(ranks[0][key] + ranks[1][key], single[key],
                                   rtol=1e-10, atol=1e-12)


@pytest.mark.e2e  # two processes (gloo)
def test_default_mode_keeps_per_rank_statistics(tmp_path):
    ranks = launch_two(tmp_path, sync=False)
    for rank_id, rank in enumerate(ranks):
        alone = run_layer(MABN2d(3, **LAYER).double().train(), slice(rank_id, rank_id + 1))
        for key in ("running_second_moment", "chi2_buffer", "psi_buffer", "y", "dx"):
            torch.testing.assert_close(rank[key], alone[key], rtol=1e-10, atol=1e-12)
    assert not torch.allclose(ranks[0]["running_second_moment"],
                              ranks[1]["running_second_moment"])


def test_sync_without_process_group_is_per_process():
    synced = run_layer(MABN2d(3, sync=True, **LAYER).double().train(), slice(0, 2))
    plain = run_layer(MABN2d(3, **LAYER).double().train(), slice(0, 2))
    for key, value in plain.items():
        torch.testing.assert_close(synced[key], value)
