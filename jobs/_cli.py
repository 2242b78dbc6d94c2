"""Shared command-line conventions: one-line usage errors with exit code 2."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import NoReturn

USAGE_ERROR = 2
CLOSED_PIPE = 141
"""Exit code when the reader of stdout went away (``| head``): 128 + SIGPIPE, as a shell reports a
Unix tool that the signal ended."""


class UsageError(Exception):
    """A problem with what the user asked for; reported in one line, exit code 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit code 2."""

    def error(self, message: str):
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(USAGE_ERROR)

    def require_positive(self, args: argparse.Namespace, *names: str) -> None:
        """A usage error for the first of ``names`` (attribute names) whose value is below 1."""
        for name in names:
            if getattr(args, name) < 1:
                self.error(f"--{name.replace('_', '-')} must be at least 1")

    def require_fraction(self, args: argparse.Namespace, *names: str) -> None:
        """A usage error for the first of ``names`` (attribute names) given outside [0, 1]."""
        for name in names:
            value = getattr(args, name)
            if value is not None and not 0 <= value <= 1:
                self.error(f"--{name.replace('_', '-')} must be in [0, 1]")


MAX_SCALE = 8.0


def scale_factor(text: str) -> float | str:
    """The value of a ``--scale`` flag: ``auto`` or a factor in (0, :data:`MAX_SCALE`]."""
    problem = f"must be auto or a factor in (0, {MAX_SCALE:g}], got {text!r}"
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(problem) from None
    if not 0 < value <= MAX_SCALE:
        raise argparse.ArgumentTypeError(problem)
    return value


def fail_usage(prog: str, message: str) -> int:
    """Print ``message`` as a one-line usage error and return the usage exit code."""
    first_line = str(message).strip().splitlines()[0] if str(message).strip() else "error"
    print(f"{prog}: error: {first_line}", file=sys.stderr)
    return USAGE_ERROR


def run_main(main: Callable[[], int]) -> NoReturn:
    """Exit with ``main()``'s code. A reader that stops early (``python -m jobs.stats RUN | head``)
    ends the job quietly with :data:`CLOSED_PIPE` instead of a BrokenPipeError traceback."""
    try:
        try:
            code = main()
        finally:
            sys.stdout.flush()  # here, not at interpreter exit, where a closed pipe cannot be caught
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit flush writes nowhere
        sys.exit(CLOSED_PIPE)
    sys.exit(code)
