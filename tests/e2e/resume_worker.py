"""Subprocess of tests/e2e/test_resume.py: trains with tools/train_net.py's set-up (the test
gives the tiny config) and appends ``{"iteration", "total_loss"}`` of every step to ``LOSSES``
(JSON lines).

Usage: python tests/e2e/resume_worker.py LOSSES [train_net.py arguments]
"""

from __future__ import annotations

import json
import sys

from detectron2.engine import default_argument_parser, hooks

from mabn_d2.engine import MABNTrainer, setup_from_args


class RecordLosses(hooks.HookBase):
    def __init__(self, path: str) -> None:
        self.path = path

    def after_step(self) -> None:
        loss = self.trainer.storage.history("total_loss").latest()
        with open(self.path, "a") as f:
            f.write(json.dumps({"iteration": self.trainer.iter, "total_loss": loss}) + "\n")
            f.flush()


def main() -> None:
    losses_path, rest = sys.argv[1], sys.argv[2:]
    args = default_argument_parser().parse_args(rest)
    cfg = setup_from_args(args)
    trainer = MABNTrainer(cfg)
    trainer.register_hooks([RecordLosses(losses_path)])
    trainer.resume_or_load(resume=args.resume)
    trainer.train()


if __name__ == "__main__":
    main()
