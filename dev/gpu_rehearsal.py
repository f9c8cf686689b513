#!/usr/bin/env python3
"""Rehearse the GPU check on a CPU machine (``make gpu-rehearsal``).

1. A stand-in for the GPU machine's image: a Python 3.12 virtual environment with what the
   image holds that the check uses -- torch 2.11 / torchvision 0.26 (with triton 3.6),
   numpy 2, Pillow, pytest, ninja, ... (:data:`IMAGE_STAND_INS`) -- installed from the
   package index through a local cache of wheels. It is kept in ``--cache`` and reused while
   the stand-ins and the interpreter are the same (installing torch's 3 GB is most of a cold
   rehearsal's time); ``--fresh-image`` builds it anew in a temporary folder.
2. A fresh Python 3.12 virtual environment that sees the image's packages (a ``.pth`` file),
   as the GPU machine's Python sees its image. In it, with the package index and the network
   shut off (``PIP_NO_INDEX``, no pip configuration, a dead proxy), ``dev/gpu_check.py
   --no-cuda`` installs the wheelhouse with ``pip --no-index`` into a fresh target folder,
   imports ``mabn_d2`` and ``detectron2``, finds a model-zoo config, collects the CUDA tier
   (every test skipped: no GPU), and runs the CPU layer tests -- the C++ kernels built from
   scratch with torch 2.11.
3. Wall times of each step go to ``rehearsal.json`` beside gpu_check's report.

Only the standard library is used here. Exit status: gpu_check's.

Example::

    python3 dev/gpu_rehearsal.py --wheelhouse output/gpu_wheelhouse --out output/gpu_rehearsal
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The GPU machine's packages that the check uses, in versions like the image's (KINDS.md;
# setuptools < 82 as torch 2.11 requires).
IMAGE_STAND_INS = ["torch==2.11.0", "torchvision==0.26.0", "numpy>=2", "pillow>=11",
                   "matplotlib", "pyyaml", "tabulate", "cloudpickle", "tqdm", "tensorboard",
                   "packaging", "portalocker", "pytest", "psutil", "setuptools<82", "wheel",
                   "ninja", "typing-extensions"]
DEFAULT_CACHE = Path.home() / ".cache" / "mabn_d2" / "gpu_rehearsal"


def run(command: list[str], env: dict[str, str] | None = None) -> float:
    """Run ``command`` (exit on failure); its wall time in seconds."""
    print("+", " ".join(command), flush=True)
    start = time.monotonic()
    if subprocess.run(command, env=env, check=False).returncode != 0:
        sys.exit(f"gpu_rehearsal: failed: {' '.join(command)}")
    return time.monotonic() - start


def image_stand_in(python: str, root: Path, wheel_cache: Path, times: dict[str, float]) -> Path:
    """The site-packages of the image stand-in in ``root`` (built there unless complete)."""
    done = root / ".complete"
    venv_python = str(root / "bin" / "python")
    if not done.is_file():
        shutil.rmtree(root, ignore_errors=True)
        times["image_create_venv"] = run([python, "-m", "venv", str(root)])
        times["image_download"] = run([venv_python, "-m", "pip", "download", "-q", "-d",
                                       str(wheel_cache), *IMAGE_STAND_INS])
        times["image_install"] = run([venv_python, "-m", "pip", "install", "-q", "--no-index",
                                      "--find-links", str(wheel_cache), *IMAGE_STAND_INS])
        done.write_text(json.dumps(IMAGE_STAND_INS))
    (site_packages,) = (root / "lib").glob("python3*/site-packages")
    return site_packages


def fresh_venv(python: str, root: Path, image_site: Path) -> str:
    """A new virtual environment that also imports the image stand-in's packages."""
    run([python, "-m", "venv", str(root)])
    (site_packages,) = (root / "lib").glob("python3*/site-packages")
    (site_packages / "gpu_image_stand_in.pth").write_text(f"{image_site}\n")
    return str(root / "bin" / "python")


def offline_environment(extensions_dir: Path) -> dict[str, str]:
    """No package index, no pip configuration, no network; nothing of this machine's Python
    path; a cold C++ extension cache."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PIP_") and k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    dead_proxy = "http://127.0.0.1:9"
    env.update(PIP_NO_INDEX="1", PIP_CONFIG_FILE=os.devnull, http_proxy=dead_proxy,
               https_proxy=dead_proxy, HTTP_PROXY=dead_proxy, HTTPS_PROXY=dead_proxy,
               TORCH_EXTENSIONS_DIR=str(extensions_dir), OMP_NUM_THREADS="1")
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default="python3.12",
                        help="a Python 3.12 interpreter (the GPU machine's version)")
    parser.add_argument("--wheelhouse", type=Path, default=REPO / "output" / "gpu_wheelhouse")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                        help="the image stand-in and its wheels, kept between rehearsals")
    parser.add_argument("--fresh-image", action="store_true",
                        help="build the image stand-in anew (temporary), not from --cache")
    parser.add_argument("--out", type=Path, default=REPO / "output" / "gpu_rehearsal")
    parser.add_argument("--parts", default="install,environment,cuda_tier,cpu_tests",
                        help="gpu_check parts to rehearse")
    args = parser.parse_args(argv)
    if not sorted(args.wheelhouse.glob("*.whl")):
        sys.exit(f"gpu_rehearsal: no wheels in {args.wheelhouse}: make gpu-wheelhouse first")
    python = shutil.which(args.python) or args.python
    times: dict[str, float] = {}
    start = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    version = subprocess.run([python, "-c", "import sys; print(sys.version)"],
                             capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256(json.dumps([version, IMAGE_STAND_INS]).encode()).hexdigest()[:12]
    with tempfile.TemporaryDirectory(prefix="gpu_rehearsal_") as tmp:
        image_root = (Path(tmp) / "image" if args.fresh_image
                      else args.cache / f"image-{key}")
        image_site = image_stand_in(python, image_root, args.cache / "wheels", times)
        venv_start = time.monotonic()
        venv_python = fresh_venv(python, Path(tmp) / "venv", image_site)
        times["fresh_venv"] = time.monotonic() - venv_start
        check_start = time.monotonic()
        check = subprocess.run(
            [venv_python, str(REPO / "dev" / "gpu_check.py"), "--no-cuda",
             "--wheelhouse", str(args.wheelhouse), "--site", str(Path(tmp) / "site"),
             "--out", str(args.out), "--parts", args.parts, "--budget-s", "3600"],
            env=offline_environment(Path(tmp) / "torch_extensions"), check=False)
        times["gpu_check"] = time.monotonic() - check_start
    times["total"] = time.monotonic() - start
    wheel_bytes = sum(p.stat().st_size for p in args.wheelhouse.glob("*.whl"))
    summary = {"python": python, "image_stand_ins": IMAGE_STAND_INS,
               "image_stand_in_reused": "image_install" not in times,
               "wheelhouse_bytes": wheel_bytes, "seconds": {k: round(v, 1)
                                                            for k, v in times.items()},
               "gpu_check_exit_status": check.returncode}
    (args.out / "rehearsal.json").write_text(json.dumps(summary, indent=2))
    print(f"gpu_rehearsal: {json.dumps(summary['seconds'])}; wheelhouse "
          f"{wheel_bytes / 2**20:.2f} MiB; gpu_check exit status {check.returncode}; report "
          f"{args.out / 'report.md'}", flush=True)
    return check.returncode


if __name__ == "__main__":
    sys.exit(main())
