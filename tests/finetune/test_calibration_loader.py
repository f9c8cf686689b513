"""The calibration hook reads its loader in one bounded pass, whatever the loader.

detectron2 v0.6's aspect-ratio grouping keeps its buckets across iterators: an iterator
abandoned right after yielding a batch leaves that bucket full, and a second iterator of the
same loader then never completes a batch when all images share one orientation, reading
images without end. The calibration used to iterate the loader twice (forward, then backward
calibration) and hung there.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from detectron2.data import build_detection_train_loader
from detectron2.layers import Conv2d
from torch import nn

from mabn_d2 import MABN2d
from mabn_d2.engine.hooks import MABNCalibrationHook
from mabn_d2.finetune.calibration import read_batches
from mabn_d2.finetune.convert import SOURCE_AFFINE

BATCH = 2
LIMIT = 100  # images read before the mapper declares the loader runaway


class RunawayLoader(RuntimeError):
    pass


class CountingMapper:
    """detectron2 mapper of square 8x8 images; counts the images it maps."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, record: dict) -> dict:
        self.calls += 1
        if self.calls > LIMIT:
            raise RunawayLoader(f"{self.calls} images read: the loader runs without end")
        gen = torch.Generator().manual_seed(record["image_id"])
        return {"image": torch.rand(3, 8, 8, generator=gen) * 255, "width": 8, "height": 8}


class LossNet(nn.Module):
    """conv -> MABN (converted from a frozen affine: calibration 'auto' measures it)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = Conv2d(3, 4, 3, padding=1, bias=False, norm=MABN2d(4, buffer_size=2))
        self.conv.norm.converted_from = SOURCE_AFFINE

    def forward(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        x = torch.stack([d["image"] for d in batch]) / 255
        return {"loss": F.relu(self.conv(x)).square().mean()}


def square_loader(mapper: CountingMapper):
    records = [{"image_id": i, "width": 8, "height": 8, "file_name": f"{i}.png"}
               for i in range(10)]
    return build_detection_train_loader(records, mapper=mapper, total_batch_size=BATCH,
                                        aspect_ratio_grouping=True, num_workers=0)


def test_calibration_hook_on_single_orientation_images_reads_a_bounded_number():
    mapper = CountingMapper()
    model = LossNet().train()
    hook = MABNCalibrationHook(model, lambda: square_loader(mapper), num_batches=3, mode="auto")
    hook.before_train()
    assert hook.report.num_batches == 3 and hook.backward_report.num_batches == 3
    assert mapper.calls == 3 * BATCH
    norm = model.conv.norm
    assert norm.iteration == 1000 and norm.psi_buffer.abs().sum() > 0


def test_read_batches_closes_its_iterator_and_checks_its_count():
    closed = []

    def generator():
        try:
            yield from range(10)
        finally:
            closed.append(True)

    assert read_batches(generator(), 3) == [0, 1, 2] and closed == [True]
    assert read_batches([1, 2], 5) == [1, 2]  # fewer if the data ends first
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="num_batches must be an integer >= 1"):
            read_batches([1], bad)
