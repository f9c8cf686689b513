"""mabn_d2: Moving Average Batch Normalization for detectron2."""

import importlib.util
import json
import sys
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent


def cpu_kernels() -> tuple[list, dict]:
    """``(ext_modules, cmdclass)`` building the C++ CPU kernels at install, as detectron2 builds
    its ``_C``: ``mabn_d2.kernels._C`` plus a record of what it was built from
    (mabn_d2/kernels/cpp.py loads it only if that still matches). Nothing where torch cannot
    be imported at build time, and a warning, not a failed install, where the build fails (no
    compiler): the kernels are then built just in time at first use, or MABN runs on the plain
    PyTorch kernels."""
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("mabn_d2: torch is not importable at build time: the C++ CPU kernels will be "
              "built at first use", file=sys.stderr)
        return [], {}
    # cpp.py by its path: the flags and the record come from the module that loads the build.
    spec = importlib.util.spec_from_file_location("_mabn_d2_cpp",
                                                  HERE / "mabn_d2" / "kernels" / "cpp.py")
    cpp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cpp)
    cflags, ldflags = cpp.build_flags()
    record = cpp.build_record()

    class BuildKernels(BuildExtension):
        def run(self) -> None:
            try:
                super().run()  # builds in build/, then copies in place for `pip install -e .`
            except Exception as e:  # any compiler problem: fall back at run time
                print(f"mabn_d2: WARNING: could not build the C++ CPU kernels at install "
                      f"({type(e).__name__}: {e}); they will be built at first use if a "
                      "compiler is there then, else MABN runs on the plain PyTorch kernels",
                      file=sys.stderr)
                return
            for ext in self.extensions:  # the record next to the library, wherever it went
                library = Path(self.get_ext_fullpath(ext.name))
                if library.exists():
                    # with the library's size and SHA-256: checked before it is loaded
                    cpp.record_path(library).write_text(
                        json.dumps({**record, "library": cpp._fingerprint(library)}))

        def get_outputs(self) -> list[str]:
            return [path for path in super().get_outputs() if Path(path).exists()]

    kernels = CppExtension(
        cpp.INSTALLED_MODULE,
        sources=[str(p.relative_to(HERE)) for p in cpp._sources()],
        extra_compile_args=[*cflags, "-g0"],  # no debug info: a faster build, a smaller library
        extra_link_args=ldflags,
    )
    return [kernels], {"build_ext": BuildKernels}


ext_modules, cmdclass = cpu_kernels()

setup(
    name="mabn_d2",
    version="0.1.0",
    description="Moving Average Batch Normalization (MABN, ICLR 2020) as a detectron2 plugin",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["mabn_d2", "mabn_d2.*"]),
    # The C++ sources of the CPU kernels: built at install (ext_modules) and, where that build
    # is missing or stale, just in time at first use (mabn_d2/kernels/cpp.py).
    package_data={"mabn_d2.kernels": ["csrc/*.cpp", "csrc/*.h"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
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
        "ninja",  # builds the C++ CPU kernels (at install, else at first use)
    ],
    extras_require={"test": ["pytest", "ruff"]},
)
