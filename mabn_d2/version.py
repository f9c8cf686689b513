"""The package's version (also in setup.py), importable without detectron2."""

__version__ = "0.1.0"
