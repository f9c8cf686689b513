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
    # 3.10: zip(strict=...), and the tarfile extraction filter of tools/install_detectron2.py
    # (3.10.12+); tested on 3.11, 3.12 and 3.13.
    python_requires=">=3.10",
    # detectron2 is installed by `make venv` (tools/install_detectron2.py; see README): it is not
    # on PyPI. torch >= 2.3: the C++ CPU kernels implement c10::Allocator::copy_data (new in 2.3)
    # and read torch.backends.cpu.get_cpu_capability; `make venv` pins torch 2.14.1.
    install_requires=[
        "torch>=2.3",
        "fvcore",
        "numpy",
        "Pillow",
        "pycocotools",
        "tabulate",
        "ninja",  # builds the C++ CPU kernels at first use (else plain PyTorch, with a warning)
    ],
    extras_require={"test": ["pytest", "ruff"]},
)
