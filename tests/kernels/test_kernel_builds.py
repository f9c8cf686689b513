"""Where the C++ CPU kernels come from: the build made at install (setup.py), used when it is
current, so that no process compiles at first use; the just-in-time build where it is stale or
missing; and an install that still succeeds without a compiler."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from mabn_d2.kernels import cpp

from helpers import REPO, run_python, running_in_ci, subprocess_env


@pytest.mark.e2e  # a child Python
def test_installed_build_is_loaded_without_compiling(tmp_path):
    # `make venv` (CI's too) builds the kernels at install: a process with an empty extension
    # cache must load that build and compile nothing.
    if cpp._installed_library() is None:
        message = "the C++ kernels were not built at install (pip install -e . builds them)"
        if running_in_ci():
            pytest.fail(f"CI={os.environ['CI']}: {message}")
        pytest.skip(message)
    extensions = tmp_path / "torch_extensions"
    extensions.mkdir()
    result = run_python(
        """
        import json, torch
        from mabn_d2 import MABN2d
        from mabn_d2.kernels import cpp
        MABN2d(4)(torch.randn(2, 4, 3, 3, requires_grad=True)).sum().backward()
        print(json.dumps(cpp.build_info()))
        """,
        TORCH_EXTENSIONS_DIR=str(extensions), **{cpp.BUILD_ENV: "auto"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    info = json.loads(result.stdout.strip().splitlines()[-1])
    assert info == {"build": "installed", "installed_skipped": None, "error": None}, info
    assert list(extensions.iterdir()) == []  # nothing compiled just in time


def test_installed_build_is_skipped_when_stale():
    current = cpp.build_record()
    assert cpp.installed_build_problem(current) is None
    assert "no build record" in cpp.installed_build_problem(None)
    edited = {**current, "sources": "0" * 64}  # csrc/ edited after `pip install -e .`
    assert "csrc/ changed" in cpp.installed_build_problem(edited)
    other_torch = {**current, "torch": "1.0.0"}
    assert "torch 1.0.0" in cpp.installed_build_problem(other_torch)
    other_cpu = {**current, "cflags": [*current["cflags"], "-mavx512f"]}
    if "-mavx512f" not in current["cflags"]:
        assert "-mavx512f" in cpp.installed_build_problem(other_cpu)


def test_source_digest_covers_every_source_and_header(tmp_path, monkeypatch):
    csrc = tmp_path / "csrc"
    shutil.copytree(cpp._CSRC, csrc)
    monkeypatch.setattr(cpp, "_CSRC", csrc)
    digest = cpp.source_digest()
    for f in sorted([*csrc.glob("*.cpp"), *csrc.glob("*.h")]):
        text = f.read_text()
        f.write_text(text + "\n")
        assert cpp.source_digest() != digest, f.name
        f.write_text(text)
    assert cpp.source_digest() == digest


@pytest.mark.e2e  # pip builds a wheel
def test_install_without_a_compiler_still_succeeds(tmp_path):
    # No compiler at install: a warning, a package without the library, and the kernels are
    # built at first use (or the plain ones serve).
    src = tmp_path / "src"
    shutil.copytree(REPO / "mabn_d2", src / "mabn_d2",
                    ignore=shutil.ignore_patterns("__pycache__", "_C.*"))
    for name in ("setup.py", "README.md"):
        shutil.copy(REPO / name, src / name)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation",
         "--no-cache-dir", "-w", str(tmp_path / "wheels"), str(src)],
        env=subprocess_env(CXX="/bin/false", CC="/bin/false"), capture_output=True, text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "could not build the C++ CPU kernels at install" in result.stdout + result.stderr
    (wheel,) = (tmp_path / "wheels").glob("mabn_d2-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "mabn_d2/kernels/csrc/fused_step.cpp" in names  # for the build at first use
    assert not [n for n in names if "/_C." in n], names


def test_each_python_abi_keeps_its_own_build_record(tmp_path):
    # CI installs two stacks (Python 3.11 and 3.13) into one checkout side by side: one
    # record for both would make each build look damaged to the other.
    libraries = [tmp_path / "_C.cpython-311-x86_64-linux-gnu.so",
                 tmp_path / "_C.cpython-313-x86_64-linux-gnu.so"]
    records = [cpp.record_path(library) for library in libraries]
    assert len(set(records)) == 2
    assert all(record.parent == tmp_path for record in records)


def test_installed_library_is_checked_against_its_recorded_size_and_sha256(tmp_path):
    library = tmp_path / "_C.so"
    library.write_bytes(b"\x7fELF" + bytes(range(256)) * 64)
    record = {**cpp.build_record(), "library": cpp._fingerprint(library)}
    assert cpp.installed_library_problem(library, record) is None
    assert cpp.installed_library_problem(library, cpp.build_record()) is None  # older record
    library.write_bytes(library.read_bytes()[:1000])  # a copy cut short
    assert "recorded size and SHA-256" in cpp.installed_library_problem(library, record)
