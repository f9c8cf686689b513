"""Files written whole or not at all.

:func:`atomic_write` is how mabn_d2 writes files whose loss would hurt (checkpoints,
``last_checkpoint``, converted checkpoints, checked annotation files): a process killed during
the write, or a full disk, leaves the previous file intact.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from typing import IO

__all__ = ["atomic_write", "is_temporary_file"]

_TMP_SUFFIX = ".tmp"


def _temporary_name(path: str) -> str:
    """A fresh hidden name beside ``path``: ``.<name>.<pid>.<random>.tmp``."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.{os.getpid()}.{secrets.token_hex(4)}{_TMP_SUFFIX}")


def is_temporary_file(name: str) -> bool:
    """Whether ``name`` (a basename) is a temporary file of :func:`atomic_write`."""
    return name.startswith(".") and name.endswith(_TMP_SUFFIX)


def _fsync_folder(folder: str) -> None:
    # Makes the rename durable (POSIX); not possible on every platform or file system.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str, write: Callable[[IO[bytes]], None]) -> None:
    """Write a local file so that it holds either its old content or all of the new one.

    ``write(f)`` writes the content into a temporary file beside ``path`` (same folder, hence
    the same file system); it is flushed and fsync'ed, then renamed over ``path``, then the
    folder is fsync'ed. If ``write`` (or anything after it) fails, the temporary file is
    removed and ``path`` is untouched; a process killed meanwhile leaves only a hidden
    ``.<name>.*.tmp`` (:func:`is_temporary_file`) next to an intact ``path``.
    """
    tmp = _temporary_name(path)
    # os.open with 0o666: the file gets the process's umask, as open(path, "wb") would.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_folder(os.path.dirname(os.path.abspath(path)))
