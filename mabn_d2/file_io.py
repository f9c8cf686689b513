"""Files written whole or not at all, and the paths a user gives checked before use.

:func:`atomic_write` is how mabn_d2 writes files whose loss would hurt (checkpoints,
``last_checkpoint``, converted checkpoints, checked annotation files): a process killed during
the write, or a full disk, leaves the previous file intact.

:func:`check_output_dir` and :func:`check_weights_file` refuse a folder that cannot be written
and a weights file that is not a complete checkpoint with a :class:`~mabn_d2.cli.UserError`
naming the key, before anything is created (:mod:`mabn_d2.validation` calls them for every
tool).
"""

from __future__ import annotations

import os
import secrets
import zipfile
from collections.abc import Callable
from typing import IO

from .cli import UserError

__all__ = ["atomic_write", "is_temporary_file", "check_output_dir", "check_weights_file"]

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


def _is_url(path: str) -> bool:
    return "://" in path


def check_output_dir(path: str, key: str) -> None:
    """``path`` is a folder this process can create and write into (PathManager URLs are not
    checked).

    Raises:
        UserError: a file is in the way, the folder (or the nearest existing parent, where it
            would be created) is on a read-only file system or not writable by this user.
    """
    if not path or _is_url(path):
        return
    target = os.path.abspath(path)
    fix = f"give {key} a folder you can write into (e.g. {key} ./output/my_run)"
    existing = target
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        where = "is a file" if existing == target else f"lies under {existing}, which is a file"
        raise UserError(f"{key} {path} {where}, not a folder: {fix}")
    try:
        read_only = bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    if read_only:
        raise UserError(f"{key} {path}: {existing} is on a read-only file system: {fix}")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "the folder" if existing == target else f"{existing}, where it would be created,"
        raise UserError(f"{key} {path}: {what} is not writable by this user (permission "
                        f"denied): {fix}, or change its permissions")


def _looks_like_text(head: bytes) -> bool:
    return bool(head) and all(b in b"\t\n\r" or 32 <= b < 127 for b in head)


def check_weights_file(path: str, key: str) -> None:
    """``path`` is plausibly a complete checkpoint: it exists, is not empty, is not a text
    file, and a zip archive (``torch.save``'s format) has an intact table of contents and
    checksums. URLs (``detectron2://``, ``https://``) and ``""`` (no weights) pass.

    Raises:
        UserError: naming ``key``, the file and what is wrong with it.
    """
    if not path or _is_url(path):
        return
    fix = "give the path of a complete checkpoint (e.g. OUTPUT_DIR/model_final.pth of a run)"
    if not os.path.exists(path):
        raise UserError(f"{key} {path}: no such file; {fix}")
    if os.path.isdir(path):
        raise UserError(f"{key} {path} is a folder, not a checkpoint file; {fix}")
    if not os.access(path, os.R_OK):
        raise UserError(f"{key} {path}: no permission to read it")
    if os.path.getsize(path) == 0:
        raise UserError(f"{key} {path} is empty (0 bytes: a save or copy that was cut short); "
                        f"{fix}")
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(path) as archive:
                damaged = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as error:
            raise UserError(f"{key} {path} is truncated or damaged (not a complete zip archive, "
                            f"the format of torch.save: {error}); {fix}") from None
        if damaged is not None:
            raise UserError(f"{key} {path} is damaged (checksum error in {damaged}); {fix}")
    elif _looks_like_text(head) and head[:1] not in b"(}]cdl":  # not a protocol-0 pickle
        raise UserError(f"{key} {path} is a text file, not a checkpoint (it starts with "
                        f"{head[:24]!r}); {fix}")
