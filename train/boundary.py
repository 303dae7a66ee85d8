"""The command-line boundary of ``python -m train`` and ``python -m train.cache_teacher`` (as the
``fastenc`` CLI's): every error is one line on stderr, never a traceback (``-v`` shows one for an
unexpected error); exit 2 for bad input (FastencError), 1 for a failed write or an unexpected error,
130 when interrupted."""

from __future__ import annotations

import sys
from typing import Callable

from fastenc.cli import Parser  # noqa: F401 - re-exported: usage errors on one line, exit 2
from fastenc.cli import _one_line as one_line, _os_error as os_error
from fastenc.errors import FastencError


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
