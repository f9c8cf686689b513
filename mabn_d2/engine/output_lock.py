"""One run per ``OUTPUT_DIR`` at a time.

Two jobs writing into one folder overwrite each other's checkpoints, ``last_checkpoint``,
``config.yaml``, logs and metrics, and both exit 0. :class:`OutputDirLock` is an exclusive,
non-blocking ``flock`` on ``OUTPUT_DIR/.mabn_d2.lock`` held for the life of the process: a
second job meets a clear :class:`OutputDirBusyError` naming the folder and the job holding it.
The operating system releases the lock when its process ends, however it ends (``kill -9``
included), so the lock of a dead process never blocks a later run; the file's content (pid,
host, start time, command) only serves the message.

:func:`hold_output_dir` takes the lock for the rest of the process (``setup_from_args`` calls
it in the main process before anything is written into the folder).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import sys

from ..cli import UserError

__all__ = ["LOCK_FILE", "OutputDirBusyError", "OutputDirError", "OutputDirLock", "hold_output_dir"]

logger = logging.getLogger(__name__)

LOCK_FILE = ".mabn_d2.lock"

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no flock
    fcntl = None  # type: ignore[assignment]


class OutputDirBusyError(UserError, RuntimeError):
    """Another live process holds the lock of this ``OUTPUT_DIR``."""


class OutputDirError(UserError):
    """``OUTPUT_DIR`` cannot be created or written (a file in the way, no permission, a
    read-only file system)."""


class OutputDirLock:
    """An exclusive lock on an output folder (see the module docstring).

    Usable as a context manager; :meth:`acquire` raises :class:`OutputDirBusyError` at once
    (it does not wait) when another process, or another lock object of this process, holds
    the folder.
    """

    def __init__(self, output_dir: str) -> None:
        self.output_dir = os.path.abspath(output_dir)
        self.path = os.path.join(self.output_dir, LOCK_FILE)
        self._fd: int | None = None
        self._writable = False

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> OutputDirLock:
        if self._fd is not None:
            return self
        if fcntl is None:  # pragma: no cover
            logger.warning("No file locking on this platform: %s is not protected against a "
                           "second run writing into it", self.output_dir)
            return self
        fd = self._open()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise OutputDirBusyError(
                f"OUTPUT_DIR {self.output_dir} is in use by another run ({holder}). Two runs "
                "in one OUTPUT_DIR overwrite each other's checkpoints, config.yaml and logs. "
                "Give this run its own folder (e.g. add 'OUTPUT_DIR output/another_run' to "
                "the command line), or wait until that run has ended."
            ) from None
        except OSError as error:  # e.g. a file system without flock support
            os.close(fd)
            logger.warning("Cannot lock %s (%s): it is not protected against a second run "
                           "writing into it", self.output_dir, error)
            return self
        if self._writable:
            _write_holder(fd)
        self._fd = fd
        return self

    def _open(self) -> int:
        """The lock file's descriptor, for writing if possible. A lock file this user may not
        write (left by another user's run, mode 0644) is opened read-only: ``flock`` works on
        it all the same, so a finished run's file never blocks anyone (the holder's details
        are then not recorded in it)."""
        try:
            os.makedirs(self.output_dir, exist_ok=True)
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
                self._writable = True
            except PermissionError:
                if not os.path.isfile(self.path):
                    raise
                fd = os.open(self.path, os.O_RDONLY)
                self._writable = False
        except OSError as error:
            raise OutputDirError(
                f"OUTPUT_DIR {self.output_dir} cannot be used: {error.strerror or error} "
                f"({type(error).__name__}). Give the run a folder you can write into (e.g. "
                "add 'OUTPUT_DIR output/another_run' to the command line).") from None
        return fd

    def release(self) -> None:
        """Release the lock (the file stays: removing it would race with a new holder)."""
        if self._fd is None:
            return
        if self._writable:
            os.ftruncate(self._fd, 0)
        os.close(self._fd)  # closing the descriptor releases the flock
        self._fd = None

    def __enter__(self) -> OutputDirLock:
        return self.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def _write_holder(fd: int) -> None:
    info = {"pid": os.getpid(), "host": socket.gethostname(),
            "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join(sys.argv)}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 1 << 16, 0).decode())
        return (f"pid {info['pid']} on {info['host']}, started {info['started']}: "
                f"{info['command']}")
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"


_held: dict[str, OutputDirLock] = {}


def hold_output_dir(output_dir: str) -> OutputDirLock:
    """Lock ``output_dir`` until this process ends (idempotent within a process).

    Raises:
        OutputDirBusyError: another process holds it.
    """
    key = os.path.realpath(output_dir)
    lock = _held.get(key)
    if lock is None:
        lock = OutputDirLock(output_dir).acquire()
        _held[key] = lock
        logger.info("mabn_d2: %s is this run's (lock %s)", lock.output_dir, LOCK_FILE)
    return lock
