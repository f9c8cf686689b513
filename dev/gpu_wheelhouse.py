#!/usr/bin/env python
"""Fill the wheelhouse for the GPU machine (``make gpu-wheelhouse``, needs the package index).

The GPU machine has no network. Its image (``dev/gpu_machine_packages.txt``: Python 3.12,
torch, triton, numpy 2, Pillow, matplotlib, ...) lacks what detectron2 and mabn_d2 import
besides: those travel with the working tree as wheels (``output/gpu_wheelhouse/``, ignored by
git, named in the device tool's ``carry``) and ``dev/gpu_check.py`` installs them with
``pip --no-index``.

The wheelhouse holds

* detectron2: the patched, pure-Python v0.6 source tree that ``tools/install_detectron2.py``
  prepares (:func:`install_detectron2.prepare_pure_v06_source`), built into a wheel;
* the pinned packages of :data:`PURE_WHEELS` (py3-none-any: downloaded, or built from an
  sdist where PyPI has no wheel) and :data:`BINARY_WHEELS` (CPython 3.12 manylinux x86_64).

Before it is accepted it is checked (:func:`check_wheelhouse`): one version per package,
every wheel installable on the GPU machine's Python and platform, every requirement of the
wheels and of the import chain (:data:`IMPORT_CHAIN`) either in the wheelhouse or in the
image, and at most :data:`LIMIT_BYTES` in all. The result is written to ``wheelhouse.json``.

Examples::

    .venv/bin/python dev/gpu_wheelhouse.py                  # -> output/gpu_wheelhouse/
    .venv/bin/python dev/gpu_wheelhouse.py --out /tmp/whl --check-only
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from email.parser import Parser
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

REPO = Path(__file__).resolve().parents[1]


def _load_installer():
    """tools/install_detectron2.py, the user's installer, as a module (it is a script in
    another folder than this one, not a package)."""
    if "install_detectron2" in sys.modules:
        return sys.modules["install_detectron2"]
    spec = importlib.util.spec_from_file_location("install_detectron2",
                                                  REPO / "tools" / "install_detectron2.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["install_detectron2"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


install_detectron2 = _load_installer()
IMAGE_PACKAGES_FILE = REPO / "dev" / "gpu_machine_packages.txt"
LIMIT_BYTES = 40 << 20
PYTHON_VERSION = "3.12"
PYTHON_FULL_VERSION = "3.12.3"
# manylinux tags pip accepts for the GPU machine (glibc >= 2.35), newest first.
PLATFORMS = ["manylinux_2_35_x86_64", "manylinux_2_34_x86_64", "manylinux_2_28_x86_64",
             "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64"]
# Markers of the GPU machine, to tell which requirements apply there.
MARKER_ENVIRONMENT = {
    "python_version": PYTHON_VERSION, "python_full_version": PYTHON_FULL_VERSION,
    "implementation_name": "cpython", "platform_python_implementation": "CPython",
    "sys_platform": "linux", "platform_system": "Linux", "os_name": "posix",
    "platform_machine": "x86_64", "extra": "",
}
# Pure-Python packages the image lacks, pinned to the versions the CPU environment tests.
PURE_WHEELS = {
    "fvcore": "0.1.5.post20221221",
    "iopath": "0.1.9",
    "yacs": "0.1.8",
    "termcolor": "3.3.0",
    "omegaconf": "2.3.1",
    "hydra-core": "1.3.8",
    "antlr4-python3-runtime": "4.9.3",
}
# Compiled packages the image lacks: CPython 3.12 wheels for manylinux x86_64.
BINARY_WHEELS = {"pycocotools": "2.0.11"}
# What mabn_d2, its tests, its benchmark and detectron2 import: each must be in the image or
# in the wheelhouse (their own requirements are checked from the wheels' metadata).
IMPORT_CHAIN = ["torch", "torchvision", "triton", "numpy", "Pillow", "ninja", "pytest",
                "detectron2", *install_detectron2.V06_REQUIREMENTS]


def image_packages(path: Path = IMAGE_PACKAGES_FILE) -> set[str]:
    """The canonical names of the packages the GPU machine's image holds."""
    lines = path.read_text().splitlines()
    return {canonicalize_name(line.strip()) for line in lines
            if line.strip() and not line.startswith("#")}


def pip(*args: str) -> None:
    command = [sys.executable, "-m", "pip", *args]
    print("+", " ".join(command), flush=True)
    if subprocess.run(command, check=False).returncode != 0:
        sys.exit(f"gpu_wheelhouse: failed: {' '.join(command)}")


def download_binary(name: str, version: str, dest: Path) -> None:
    """The CPython 3.12 manylinux x86_64 wheel of ``name==version``."""
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    pip("download", "--no-deps", "--only-binary=:all:", "--python-version", PYTHON_VERSION,
        "--implementation", "cp", "--abi", "cp312", *platforms, "-d", str(dest),
        f"{name}=={version}")


def build_pure(name: str, version: str, dest: Path) -> None:
    """A py3-none-any wheel of ``name==version``: PyPI's, or built from its sdist."""
    pip("wheel", "--no-deps", "-w", str(dest), f"{name}=={version}")


def build_detectron2(dest: Path, workdir: Path) -> None:
    """detectron2's wheel from the installer's patched pure-Python v0.6 source tree."""
    source = install_detectron2.prepare_pure_v06_source(workdir)
    pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(dest), str(source))


def wheel_metadata(path: Path) -> dict:
    """Name, version, ``Requires-Dist`` and tags of a wheel file."""
    name, version, _, tags = parse_wheel_filename(path.name)
    with zipfile.ZipFile(path) as archive:
        (metadata_name,) = [n for n in archive.namelist()
                            if re.fullmatch(r"[^/]+\.dist-info/METADATA", n)]
        metadata = Parser().parsestr(archive.read(metadata_name).decode("utf-8"))
    return {"name": str(name), "version": str(version),
            "requires": metadata.get_all("Requires-Dist") or [],
            "tags": sorted(str(t) for t in tags)}


def installable_on_gpu_machine(tags: list[str]) -> bool:
    """Whether one of the wheel's tags fits CPython 3.12 on manylinux x86_64 (glibc 2.35)."""
    for tag in tags:
        interpreter, abi, platform = tag.split("-")
        if interpreter not in ("py3", "cp312") or abi not in ("none", "abi3", "cp312"):
            continue
        if platform == "any" or platform in PLATFORMS:
            return True
    return False


def applies(requirement: Requirement) -> bool:
    return requirement.marker is None or requirement.marker.evaluate(MARKER_ENVIRONMENT)


def check_wheelhouse(folder: Path, image: set[str], limit_bytes: int = LIMIT_BYTES,
                     import_chain: list[str] = IMPORT_CHAIN) -> tuple[list[dict], list[str]]:
    """``(wheels, problems)``: a row per wheel, and what keeps the folder from serving the GPU
    machine (empty: it serves)."""
    wheels, problems = [], []
    for path in sorted(folder.glob("*.whl")):
        meta = wheel_metadata(path)
        meta.update(file=path.name, bytes=path.stat().st_size,
                    sha256=hashlib.sha256(path.read_bytes()).hexdigest())
        wheels.append(meta)
    names = [canonicalize_name(w["name"]) for w in wheels]
    for name in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"{name}: {names.count(name)} wheels; keep one version (two stop the "
                        "whole install)")
    available = image | set(names)
    for w in wheels:
        if not installable_on_gpu_machine(w["tags"]):
            problems.append(f"{w['file']}: tags {w['tags']} do not fit CPython "
                            f"{PYTHON_VERSION} on manylinux x86_64")
        for text in w["requires"]:
            requirement = Requirement(text)
            if applies(requirement) and canonicalize_name(requirement.name) not in available:
                problems.append(f"{w['name']} requires {text}: neither in the wheelhouse nor "
                                f"in the GPU machine's image ({IMAGE_PACKAGES_FILE.name})")
    for text in import_chain:
        name = canonicalize_name(Requirement(text).name)
        if name not in available:
            problems.append(f"the import chain needs {name}: neither in the wheelhouse nor in "
                            "the GPU machine's image")
    total = sum(w["bytes"] for w in wheels)
    if total > limit_bytes:
        problems.append(f"{total / 2**20:.1f} MiB of wheels, more than the limit of "
                        f"{limit_bytes / 2**20:.0f} MiB")
    return wheels, problems


def build(out: Path) -> None:
    """Build every wheel into a fresh folder, then replace ``out`` with it."""
    with tempfile.TemporaryDirectory(prefix="gpu_wheelhouse_") as tmp:
        staging = Path(tmp) / "wheels"
        staging.mkdir()
        for name, version in BINARY_WHEELS.items():
            download_binary(name, version, staging)
        for name, version in PURE_WHEELS.items():
            build_pure(name, version, staging)
        build_detectron2(staging, Path(tmp) / "detectron2-src")
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(staging, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "output" / "gpu_wheelhouse",
                        help="the wheelhouse")
    parser.add_argument("--check-only", action="store_true",
                        help="check an existing wheelhouse, download nothing")
    args = parser.parse_args(argv)
    if not args.check_only:
        build(args.out)
    wheels, problems = check_wheelhouse(args.out, image_packages())
    total = sum(w["bytes"] for w in wheels)
    (args.out / "wheelhouse.json").write_text(json.dumps(
        {"wheels": wheels, "bytes": total, "limit_bytes": LIMIT_BYTES, "problems": problems},
        indent=2))
    for w in wheels:
        print(f"  {w['file']:<70}{w['bytes'] / 2**10:>9.0f} KiB")
    print(f"gpu_wheelhouse: {len(wheels)} wheels, {total / 2**20:.2f} MiB in {args.out}")
    for problem in problems:
        print(f"gpu_wheelhouse: PROBLEM: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
