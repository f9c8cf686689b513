"""Backend "cpp": the C++ CPU kernels (``csrc/``), built at install, else just in time, or absent.

Every ``csrc/*.cpp`` is one translation unit of one shared library. Where it comes from, in
this order (:func:`build_info` tells which was used and why not the first):

1. **Installed**: ``pip install`` / ``make venv`` builds it as the extension
   ``mabn_d2.kernels._C`` (``setup.py``, as detectron2 builds its ``_C``) and writes next to it
   a record of what it was built from (``_C.<abi>.so.build.json``, one per Python ABI: the
   digest of ``csrc/``, the torch version, the flags). It is loaded only if that record matches
   today's sources, torch and CPU; otherwise (a stale editable install, another torch) it is
   skipped, with one log line.
2. **Just in time**: ``mabn_d2_cpp_<digest>``, built with
   :func:`torch.utils.cpp_extension.load` the first time MABN runs on the CPU in a process
   (ninja is required; it compiles the units in parallel; docs/speed.md says how long it
   takes), and cached in PyTorch's extension directory (``TORCH_EXTENSIONS_DIR``, default
   ``~/.cache/torch_extensions``), so later processes only load it, after checking it
   against the size and SHA-256 recorded at its build (:func:`verify_cached_build`: a
   truncated cached library would kill the process with ``Bus error``).
   ``MABN_D2_CPP_BUILD=jit`` skips the installed build (e.g. to test this path).
3. If neither works, a warning says why and :mod:`mabn_d2.kernels` uses the plain PyTorch
   kernels instead -- slower, never silently.

Its ops are registered with the dispatcher as ``torch.ops.mabn_d2.*`` (no pybind11 module).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import threading
import warnings
from pathlib import Path

import torch

__all__ = [
    "load",
    "available",
    "load_error",
    "build_info",
    "set_output_cache_limit",
    "output_cache_stats",
    "empty_output_cache",
    "set_streaming",
]

logger = logging.getLogger(__name__)

_CSRC = Path(__file__).with_name("csrc")
_LOCK = threading.Lock()
_STATE: dict[str, object] = {"tried": False, "ok": False, "error": None, "build": None,
                              "installed_skipped": None}
# The extension setup.py builds at install, and its record of what it was built from.
INSTALLED_MODULE = "mabn_d2.kernels._C"
RECORD_SUFFIX = ".build.json"
BUILD_ENV = "MABN_D2_CPP_BUILD"  # "auto" (default) or "jit" (skip the installed build)


def _isa_flags() -> list[str]:
    # The kernels are memory-bound: AVX2 + FMA is all they need. Chosen from what PyTorch
    # detected at run time, so a build never uses instructions this CPU lacks.
    capability = torch.backends.cpu.get_cpu_capability()
    return ["-mavx2", "-mfma", "-mf16c"] if capability in ("AVX2", "AVX512") else []


def build_flags() -> tuple[list[str], list[str]]:
    """``(compile flags, link flags)`` of both builds (setup.py's and the just-in-time one)."""
    # libgomp.so.1 resolves to the copy torch already loaded: one OpenMP runtime.
    return ["-O3", "-fopenmp", *_isa_flags()], ["-fopenmp"]


def _ensure_ninja() -> None:
    """torch's JIT builder calls ``ninja`` from PATH; the pip package may sit in the venv only."""
    if shutil.which("ninja") is not None:
        return
    try:
        import ninja  # optional: only needed to build
    except ImportError as e:
        raise RuntimeError(
            "ninja is not installed (pip install ninja, or apt-get install ninja-build)"
        ) from e
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def _ops_registered() -> bool:
    return hasattr(torch.ops.mabn_d2, "second_moment")


def load() -> bool:
    """Build (or load from the cache) the extension once per process; ``True`` on success.

    A failure is logged and warned about once, with the reason, and remembered: later calls
    return ``False`` at no cost.
    """
    if _STATE["tried"]:
        return bool(_STATE["ok"])
    with _LOCK:
        if _STATE["tried"]:
            return bool(_STATE["ok"])
        cache_megabytes = _env_cache_megabytes()  # a bad value raises here, every time
        try:
            if not _ops_registered():
                _STATE["build"] = "installed" if _load_installed() else "jit"
                if _STATE["build"] == "jit":
                    _build()
            _STATE["ok"] = _ops_registered()
            if not _STATE["ok"]:
                raise RuntimeError("the extension loaded but registered no mabn_d2 ops")
            if cache_megabytes is not None:
                torch.ops.mabn_d2.set_output_cache_limit(cache_megabytes << 20)
        except Exception as e:  # any build problem means: use the fallback
            _STATE["ok"] = False
            _STATE["build"] = None
            _STATE["error"] = f"{type(e).__name__}: {e}"
            message = (
                "mabn_d2: could not build the C++ CPU kernels, using the plain PyTorch kernels "
                f"(correct, but slower). Reason: {_STATE['error'][:2000]}"
            )
            logger.warning(message)
            warnings.warn(message, RuntimeWarning, stacklevel=2)
        _STATE["tried"] = True
    return bool(_STATE["ok"])


def _sources() -> list[Path]:
    """The translation units, in a fixed order."""
    return sorted(_CSRC.glob("*.cpp"))


def _digest(cflags: list[str]) -> str:
    """One cache entry per (text and path of every source and header, flags, torch): any edit
    rebuilds, and checkouts of different versions, or the same version in two places (a CI
    clone), never rebuild over each other."""
    files = sorted([*_CSRC.glob("*.cpp"), *_CSRC.glob("*.h")])
    parts = [part for f in files for part in (str(f), f.read_text())]
    text = "\0".join([*parts, *cflags, torch.__version__])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def source_digest() -> str:
    """Digest of the names and texts of ``csrc/``'s sources and headers (not their place): what
    setup.py records with the installed build, to know whether it is still current."""
    files = sorted([*_CSRC.glob("*.cpp"), *_CSRC.glob("*.h")])
    text = "\0".join(part for f in files for part in (f.name, f.read_text()))
    return hashlib.sha256(text.encode()).hexdigest()


def build_record() -> dict[str, object]:
    """What a build made now is made from (setup.py writes it next to the installed build)."""
    return {"sources": source_digest(), "torch": torch.__version__, "cflags": build_flags()[0]}


def installed_build_problem(record: dict[str, object] | None) -> str | None:
    """Why an installed build with this ``record`` must not be loaded here, or ``None``."""
    if record is None:
        return "no build record next to it"
    now = build_record()
    if record.get("sources") != now["sources"]:
        return "csrc/ changed since it was built (pip install -e . rebuilds it)"
    if record.get("torch") != now["torch"]:
        return f"built for torch {record.get('torch')}, this is torch {now['torch']}"
    missing = set(record.get("cflags") or []) - set(now["cflags"])  # type: ignore[arg-type]
    if missing:
        return f"built with {sorted(missing)}, which this CPU does not support"
    return None


def record_path(library: Path) -> Path:
    """Where the build record of the installed ``library`` lives: named after the library file,
    so builds for two Pythons in one checkout (``_C.cpython-311-*.so``, ``_C.cpython-313-*.so``)
    each keep their own record."""
    return library.with_name(library.name + RECORD_SUFFIX)


def installed_library_problem(library: Path, record: dict[str, object] | None) -> str | None:
    """Why the installed ``library`` does not match the size and SHA-256 its ``record`` has
    (a truncated library would kill the process with ``Bus error`` when mapped), or ``None``;
    also ``None`` for a record made before mabn_d2 recorded them."""
    recorded = (record or {}).get("library")
    if recorded is None or recorded == _fingerprint(library):
        return None
    return "it does not match its recorded size and SHA-256 (truncated or damaged)"


def _installed_library() -> Path | None:
    spec = importlib.util.find_spec(INSTALLED_MODULE)
    return Path(spec.origin) if spec is not None and spec.origin else None


def _load_installed() -> bool:
    """Load the build made at install if there is one and it is current; ``False`` (with the
    reason in :func:`build_info`) otherwise."""
    if os.environ.get(BUILD_ENV, "auto") == "jit":
        _STATE["installed_skipped"] = f"{BUILD_ENV}=jit"
        return False
    library = _installed_library()
    if library is None:
        _STATE["installed_skipped"] = "not built at install (no compiler, or no torch then)"
        logger.info("mabn_d2: the C++ kernels were not built at install; building them just in "
                    "time")
        return False
    try:
        record = json.loads(record_path(library).read_text())
    except (OSError, ValueError):
        record = None
    problem = installed_build_problem(record) or installed_library_problem(library, record)
    if problem is None:
        try:
            torch.ops.load_library(str(library))
            return True
        except OSError as e:  # e.g. a library made for another torch build
            problem = f"could not be loaded: {e}"
    _STATE["installed_skipped"] = problem
    logger.warning("mabn_d2: not using the C++ kernels built at install (%s): %s; building "
                   "them just in time instead", library, problem)
    return False


def build_info() -> dict[str, object]:
    """Which build of the C++ kernels serves this process: ``build`` is ``"installed"``,
    ``"jit"`` or ``None`` (not loaded, or failed: plain kernels), ``installed_skipped`` why the
    installed build was not used, ``error`` why no build works. Loads them on first call."""
    load()
    return {key: _STATE[key] for key in ("build", "installed_skipped", "error")}


def _build() -> None:
    from torch.utils import cpp_extension  # heavy; only when building

    _ensure_ninja()
    cflags, ldflags = build_flags()
    name = f"mabn_d2_cpp_{_digest(cflags)}"
    logger.info("mabn_d2: building/loading the C++ CPU kernels %s (cached after the first build)",
                name)
    library = Path(cpp_extension._get_build_directory(name, False)) / f"{name}.so"
    verify_cached_build(library)
    cpp_extension.load(
        name=name,
        sources=[str(f) for f in _sources()],
        extra_cflags=cflags,
        extra_ldflags=ldflags,
        is_python_module=False,
        verbose=False,
    )
    _write_fingerprint(library)


def _fingerprint(library: Path) -> str:
    data = library.read_bytes()
    return f"{len(data)} {hashlib.sha256(data).hexdigest()}"


def _fingerprint_file(library: Path) -> Path:
    return library.with_name(library.name + ".sha256")


def _write_fingerprint(library: Path) -> None:
    """After a successful build or load: record the library's size and SHA-256 beside it."""
    if library.is_file():
        _fingerprint_file(library).write_text(_fingerprint(library))


def verify_cached_build(library: Path) -> bool:
    """Check a cached extension library before it is loaded; True if it can be.

    A library is mapped into memory when loaded: a truncated one (a full disk, a copy cut
    short, a build killed while linking) kills the process with ``Bus error``, and ninja
    does not rebuild it (it is newer than the sources). Every successful build records the
    library's size and SHA-256 in ``<library>.sha256``; a cached library that does not match
    it, or has no record, is removed (one warning) so that the build makes it again."""
    if not library.exists():
        return True
    record = _fingerprint_file(library)
    try:
        if record.read_text().strip() == _fingerprint(library):
            return True
        reason = "it does not match its recorded size and SHA-256 (truncated or damaged)"
    except OSError:
        reason = "it has no record of size and SHA-256 (built by an older mabn_d2?)"
    message = f"mabn_d2: the cached C++ kernels {library} are not used: {reason}; rebuilding"
    logger.warning(message)
    warnings.warn(message, RuntimeWarning, stacklevel=3)
    library.unlink(missing_ok=True)
    record.unlink(missing_ok=True)
    return False


def available() -> bool:
    """Whether the C++ kernels are usable (builds them on the first call)."""
    return load()


def load_error() -> str | None:
    """Why the last build failed, or ``None``."""
    return _STATE["error"]  # type: ignore[return-value]


CACHE_ENV = "MABN_D2_CPU_CACHE_MB"


def _env_cache_megabytes() -> int | None:
    value = os.environ.get(CACHE_ENV)
    if value is None:
        return None
    try:
        megabytes = int(value)
    except ValueError:
        megabytes = -1
    if megabytes < 0:
        raise ValueError(f"{CACHE_ENV} must be a whole number of MiB >= 0, got {value!r}")
    return megabytes


def set_output_cache_limit(megabytes: int | None) -> None:
    """How many MiB of freed large outputs the C++ kernels keep for reuse: ``None`` (the
    default) what the model needs, a fixed number of MiB, or ``0`` to turn the cache off.

    Outputs of 4 MiB and more (``y`` in forward, ``dx`` in backward) come from a cache of
    blocks, like CUDA tensors from PyTorch's caching allocator: glibc returns such blocks to
    the OS on free, and the OS zeroes fresh pages on first touch, which at detection shapes
    costs as much as the kernel (docs/speed.md). By default freed blocks are kept up to the
    most the cache's outputs have held at once (a training step frees them all at its end and
    the next one asks for the same sizes again), so the cache never holds more than the
    model's own peak of these outputs; a fixed limit caps that further. The least recently
    freed are evicted first; ``0`` turns the cache off (and frees what it holds).
    Also set by the environment variable ``MABN_D2_CPU_CACHE_MB`` when the extension loads.
    """
    if megabytes is not None and (isinstance(megabytes, bool) or not isinstance(megabytes, int)
                                  or megabytes < 0):
        raise ValueError("the output cache limit must be None (what the model needs) or an int "
                         f"of MiB >= 0, got {megabytes!r}")
    if load():
        torch.ops.mabn_d2.set_output_cache_limit(-1 if megabytes is None else megabytes << 20)


def output_cache_stats() -> dict[str, int]:
    """The output cache's ``limit`` (bytes; -1: what the model needs), ``cached`` and
    ``in_use`` bytes, ``hits``, ``misses`` and ``peak_in_use`` (the most bytes of blocks its
    outputs held at once); empty if the C++ kernels are unavailable."""
    if not load():
        return {}
    values = torch.ops.mabn_d2.output_cache_stats()
    return dict(zip(("limit", "cached", "in_use", "hits", "misses", "peak_in_use"), values,
                    strict=True))


def empty_output_cache() -> None:
    """Return the output cache's free blocks to the OS (outputs in use are not touched)."""
    if load():
        torch.ops.mabn_d2.empty_output_cache()


def set_streaming(mode: str) -> None:
    """When the C++ kernels write large float32 outputs (>= 32 MiB) with streaming stores.

    ``"auto"`` (default): when the output's memory is already resident (reused by the
    allocator), where they save a third of the traffic of the elementwise passes; on fresh
    pages they are slower. ``"always"`` (tests) or ``"never"``. Results are identical.
    """
    modes = {"never": 0, "auto": 1, "always": 2}
    if mode not in modes:
        raise ValueError(f"streaming mode must be one of {sorted(modes)}, got {mode!r}")
    if load():
        torch.ops.mabn_d2.set_streaming(modes[mode])
