"""Subprocess of tests/test_ddp.py: ``tools/train_net.py``'s training in several CPU processes
(gloo DDP), then each rank saves its own MABN buffers to ``OUTPUT_DIR/rank<r>_mabn.pt``.

Usage: python tests/ddp_worker.py --num-gpus 2 --config-file CFG [opts ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from detectron2.engine import default_argument_parser
from detectron2.utils import comm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))  # train_net.setup
import train_net  # noqa: E402

from mabn_d2 import MABN2d  # noqa: E402
from mabn_d2.distributed import launch  # noqa: E402
from mabn_d2.engine import MABNTrainer  # noqa: E402


def main(args) -> None:
    cfg = train_net.setup(args)
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
