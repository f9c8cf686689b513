"""Training and evaluation of MABN models: detectron2's engine with mabn_d2's set-up."""

from .setup import describe_mabn_model, get_mabn_cfg, mabn_setup, setup_from_args
from .trainer import EVAL_RESULTS_FILE, MABNTrainer

__all__ = [
    "EVAL_RESULTS_FILE",
    "MABNTrainer",
    "describe_mabn_model",
    "get_mabn_cfg",
    "mabn_setup",
    "setup_from_args",
]
