"""Backend "cpp": the C++ CPU kernels (``csrc/``), compiled on first use, cached, or absent.

Every ``csrc/*.cpp`` is one translation unit of the extension ``mabn_d2_cpp_<digest>``, built
with :func:`torch.utils.cpp_extension.load` the first time MABN runs on the CPU in a process
(ninja is required; it compiles the units in parallel; docs/speed.md says how long it takes),
and cached in PyTorch's extension directory (``TORCH_EXTENSIONS_DIR``, default
``~/.cache/torch_extensions``), so later processes only load it, after checking it against
the size and SHA-256 recorded at its build (:func:`verify_cached_build`: a truncated cached
library would kill the process with ``Bus error``). If the build fails, a warning
says why and :mod:`mabn_d2.kernels` uses the plain PyTorch kernels instead -- slower, never
silently.

Its ops are registered with the dispatcher as ``torch.ops.mabn_d2.*`` (no pybind11 module).
"""

from __future__ import annotations

import hashlib
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
    "set_output_cache_limit",
    "output_cache_stats",
    "empty_output_cache",
    "set_streaming",
]

logger = logging.getLogger(__name__)

_CSRC = Path(__file__).with_name("csrc")
_LOCK = threading.Lock()
_STATE: dict[str, object] = {"tried": False, "ok": False, "error": None}


def _isa_flags() -> list[str]:
    # The kernels are memory-bound: AVX2 + FMA is all they need. Chosen from what PyTorch
    # detected at run time, so a build never uses instructions this CPU lacks.
    capability = torch.backends.cpu.get_cpu_capability()
    return ["-mavx2", "-mfma", "-mf16c"] if capability in ("AVX2", "AVX512") else []


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
                _build()
            _STATE["ok"] = _ops_registered()
            if not _STATE["ok"]:
                raise RuntimeError("the extension loaded but registered no mabn_d2 ops")
            if cache_megabytes is not None:
                torch.ops.mabn_d2.set_output_cache_limit(cache_megabytes << 20)
        except Exception as e:  # any build problem means: use the fallback
            _STATE["ok"] = False
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


def _build() -> None:
    from torch.utils import cpp_extension  # heavy; only when building

    _ensure_ninja()
    cflags = ["-O3", "-fopenmp", *_isa_flags()]
    name = f"mabn_d2_cpp_{_digest(cflags)}"
    logger.info("mabn_d2: building/loading the C++ CPU kernels %s (cached after the first build)",
                name)
    library = Path(cpp_extension._get_build_directory(name, False)) / f"{name}.so"
    verify_cached_build(library)
    cpp_extension.load(
        name=name,
        sources=[str(f) for f in _sources()],
        extra_cflags=cflags,
        # libgomp.so.1 resolves to the copy torch already loaded: one OpenMP runtime.
        extra_ldflags=["-fopenmp"],
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


def set_output_cache_limit(megabytes: int) -> None:
    """How many MiB of freed large outputs the C++ kernels keep for reuse (default 1024).

    Outputs of 4 MiB and more (``y`` in forward, ``dx`` in backward) come from a cache of
    blocks, like CUDA tensors from PyTorch's caching allocator: glibc returns such blocks to
    the OS on free, and the OS zeroes fresh pages on first touch, which at detection shapes
    costs as much as the kernel (docs/speed.md). Freed blocks stay allocated up to this
    limit, the least recently freed evicted first; ``0`` turns the cache off (and frees what
    it holds).
    Also set by the environment variable ``MABN_D2_CPU_CACHE_MB`` when the extension loads.
    """
    if isinstance(megabytes, bool) or not isinstance(megabytes, int) or megabytes < 0:
        raise ValueError(f"the output cache limit must be an int of MiB >= 0, got {megabytes!r}")
    if load():
        torch.ops.mabn_d2.set_output_cache_limit(megabytes << 20)


def output_cache_stats() -> dict[str, int]:
    """The output cache's ``limit``, ``cached`` and ``in_use`` bytes, ``hits`` and ``misses``
    (empty if the C++ kernels are unavailable)."""
    if not load():
        return {}
    values = torch.ops.mabn_d2.output_cache_stats()
    return dict(zip(("limit", "cached", "in_use", "hits", "misses"), values, strict=True))


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
