"""Fine-tuning MABN models from BN checkpoints: the exact BN -> MABN fold (``convert``),
loading any detectron2 checkpoint into an MABN model (``checkpoint``), and measuring the
statistics a checkpoint lacks (``calibration``)."""
