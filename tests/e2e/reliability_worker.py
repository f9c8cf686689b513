"""Subprocess of tests/e2e/test_training_runs.py: ``tools/train_net.py``'s training
(``setup_from_args`` + ``MABNTrainer``), which can be made to stop inside a checkpoint save.

Usage: python tests/e2e/reliability_worker.py [--block-save MARKER] [train_net.py arguments]

With ``--block-save``, the run's first checkpoint save stops while the checkpoint file is being
written (inside ``torch.save``, after the file was opened) and writes ``MARKER``: the test
kills the process there, as a ``kill -9`` during "Saving checkpoint to ..." does.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from detectron2.engine import default_argument_parser

from mabn_d2.engine import MABNTrainer, setup_from_args


class _StopWhilePickled:
    """Pickling it (during ``torch.save``) writes the marker and waits to be killed."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        Path(self.marker).write_text(str(os.getpid()))
        time.sleep(600)
        raise RuntimeError("reliability_worker: the test did not kill this process")


class StopInsideSave:
    """A checkpointable whose state is a :class:`_StopWhilePickled`."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def state_dict(self) -> dict:
        return {"stop": _StopWhilePickled(self.marker)}

    def load_state_dict(self, state: dict) -> None:
        pass


def main() -> None:
    argv = sys.argv[1:]
    marker = None
    if argv[:1] == ["--block-save"]:
        marker, argv = argv[1], argv[2:]
    args = default_argument_parser().parse_args(argv)
    cfg = setup_from_args(args)
    trainer = MABNTrainer(cfg)
    if marker is not None:
        trainer.checkpointer.add_checkpointable("stop_inside_save", StopInsideSave(marker))
    trainer.resume_or_load(resume=args.resume)
    trainer.train()


if __name__ == "__main__":
    main()
