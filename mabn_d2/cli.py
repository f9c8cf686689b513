"""How every mabn_d2 tool reports a user error, and the argument types the tools share.

A mistake of the user (a bad config value, an ``OUTPUT_DIR`` that cannot be written, a weights
file that is not a checkpoint, an image that cannot be read) is one message on stderr naming
what is wrong and how to fix it, and exit code 2; no traceback. ``--debug`` on the command
line, or ``MABN_D2_DEBUG=1`` in the environment, shows the traceback as well.

Everything else (a bug) keeps its traceback. :func:`run_tool` draws the line: it reports
:class:`UserError`, the base of the package's errors about the user's input (a busy or
unwritable ``OUTPUT_DIR``, a checkpoint that does not fit the model, ...).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

__all__ = [
    "UserError",
    "DEBUG_ENV",
    "strip_debug_flag",
    "debug_requested",
    "report_user_error",
    "run_tool",
    "int_at_least",
    "float_at_least",
]

DEBUG_ENV = "MABN_D2_DEBUG"
USER_ERROR_EXIT_CODE = 2


class UserError(Exception):
    """A mistake in what the user asked for: the message says what and how to fix it.

    The package's specific errors of this kind derive from it (``OutputDirBusyError``,
    ``MABNCheckpointError``, ``NoReadableCheckpointError``, ...)."""


def debug_requested(argv: Sequence[str] | None = None) -> bool:
    """``--debug`` in ``argv`` (default ``sys.argv``) or ``MABN_D2_DEBUG`` set to a true value."""
    argv = sys.argv[1:] if argv is None else argv
    value = os.environ.get(DEBUG_ENV, "").strip().lower()
    return "--debug" in argv or value not in ("", "0", "false", "no", "off")


def strip_debug_flag(argv: Sequence[str]) -> list[str]:
    """``argv`` without ``--debug`` (the tools' own parsers do not know it)."""
    return [a for a in argv if a != "--debug"]


def report_user_error(tool: str, error: BaseException, debug: bool = False) -> int:
    """Print ``tool: message`` (and with ``debug`` the traceback) on stderr; returns 2."""
    if debug:
        traceback.print_exception(type(error), error, error.__traceback__, file=sys.stderr)
    message = str(error).strip() or type(error).__name__
    print(f"{tool}: error: {message}", file=sys.stderr)
    if not debug:
        print(f"({tool}: add --debug or set {DEBUG_ENV}=1 to see the traceback)",
              file=sys.stderr)
    return USER_ERROR_EXIT_CODE


def run_tool(tool: str, main: Callable[[], Any], argv: Sequence[str] | None = None) -> int:
    """Run ``main()``; a :class:`UserError` becomes one message and exit
    code 2 (:func:`report_user_error`), a ``SystemExit`` passes through, ``main``'s int result
    is the exit code (None: 0)."""
    debug = debug_requested(argv)
    try:
        result = main()
    except UserError as error:
        return report_user_error(tool, error, debug)
    return int(result or 0) if isinstance(result, (int, type(None))) else 0


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer >= ``low`` (argparse names the option and exits 2)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}"
                                             ) from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def float_at_least(low: float, *, strict: bool = False) -> Callable[[str], float]:
    """An argparse ``type``: a finite number >= ``low`` (> ``low`` with ``strict``)."""
    relation = ">" if strict else ">="

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(
                f"must be a finite number {relation} {low:g}, got {text!r}")
        return value

    parse.__name__ = f"number {relation} {low:g}"
    return parse
