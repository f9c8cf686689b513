"""Subprocess of tests/e2e/test_ddp.py: ``tools/train_net.py``'s training in several CPU processes
(gloo DDP), then each rank saves its own MABN buffers to ``OUTPUT_DIR/rank<r>_mabn.pt``.

Usage: python tests/e2e/ddp_worker.py --num-gpus 2 --config-file CFG [opts ...]
"""

from __future__ import annotations

from pathlib import Path

import torch
from detectron2.engine import default_argument_parser
from detectron2.utils import comm

from mabn_d2 import MABN2d
from mabn_d2.engine import MABNTrainer, setup_from_args
from mabn_d2.engine.launch import launch


def main(args) -> None:
    cfg = setup_from_args(args)
    trainer = MABNTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()  # ends with the COCO evaluation, gathered from every rank
    model = getattr(trainer.model, "module", trainer.model)
    state = {
        f"{name}.{buffer}": getattr(module, buffer).clone()
        for name, module in model.named_modules() if isinstance(module, MABN2d)
        for buffer in ("running_second_moment", "chi2_buffer", "num_batches_tracked")
    }
    torch.save(state, Path(cfg.OUTPUT_DIR) / f"rank{comm.get_rank()}_mabn.pt")


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    launch(main, args.num_gpus, dist_url="auto", args=(args,))
