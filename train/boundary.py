"""The command-line boundary of ``python -m train`` and ``python -m train.cache_teacher`` (as the
``fastenc`` CLI's): every error is one line on stderr, never a traceback (``-v`` shows one for an
unexpected error); exit 2 for bad input (FastencError), 1 for a failed write or an unexpected error,
130 when interrupted."""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from fastenc.errors import FastencError


class Parser(argparse.ArgumentParser):
    """argparse, with usage errors on one line and exit status 2."""

    def error(self, message: str):  # noqa: D102 - argparse API
        self.exit(2, one_line(f"{self.prog}: error: {message} (see `{self.prog} --help`)") + "\n")


def one_line(text: str) -> str:
    line = " ".join(str(text).split())
    return line.encode("utf-8", "backslashreplace").decode("utf-8")  # lone surrogates cannot crash the report


def os_error(exc: OSError) -> str:
    if exc.filename is not None and exc.strerror:
        other = f" -> {exc.filename2}" if exc.filename2 is not None else ""
        return f"{exc.filename}{other}: {exc.strerror}"
    return f"{type(exc).__name__}: {exc}"


def guarded(prog: str, fn: Callable[[], int], *, verbose: bool = False, interrupted: str = "",
            memory_hint: str = "lower the batch size") -> int:
    """``fn()``'s exit status, or the status of the one line written for what it raised."""
    def say(text: str) -> None:
        sys.stderr.write(one_line(text) + "\n")

    try:
        return fn()
    except FastencError as exc:
        say(f"{prog}: error: {exc}")
        return 2
    except OSError as exc:
        say(f"{prog}: error: {os_error(exc)}")
        return 1
    except KeyboardInterrupt:
        say(f"{prog}: interrupted{f' ({interrupted})' if interrupted else ''}")
        return 130
    except MemoryError:
        say(f"{prog}: error: out of memory ({memory_hint})")
        return 1
    except Exception as exc:  # a bug: still one line, the traceback with -v
        if verbose:
            raise
        if type(exc).__name__ == "OutOfMemoryError":  # torch's, on an accelerator
            say(f"{prog}: error: out of memory on the accelerator ({exc}); {memory_hint}")
            return 1
        say(f"{prog}: internal error: {type(exc).__name__}: {exc} (run with -v for the traceback)")
        return 1
