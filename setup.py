"""mabn_d2: Moving Average Batch Normalization for detectron2."""

from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="mabn_d2",
    version="0.1.0",
    description="Moving Average Batch Normalization (MABN, ICLR 2020) as a detectron2 plugin",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["mabn_d2", "mabn_d2.*"]),
    # C++ sources of the CPU kernels, compiled at first use (mabn_d2/kernels/cpp.py).
    package_data={"mabn_d2.kernels": ["csrc/*.cpp", "csrc/*.h"]},
    python_requires=">=3.9",
    # torch/torchvision and detectron2 are installed by `make venv` (see README): detectron2
    # is not on PyPI, and torch wheels depend on the platform.
    install_requires=["torch>=1.10", "fvcore", "iopath", "pycocotools", "numpy", "Pillow"],
    extras_require={"test": ["pytest", "ruff"]},
)
