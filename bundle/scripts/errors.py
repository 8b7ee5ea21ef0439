"""The first line of a failed bundle command says what went wrong.

MONAI wraps an error raised inside a config expression in ``RuntimeError: Failed to evaluate ConfigExpression``
(or ``Failed to instantiate component``), so the traceback of ``python -m monai.bundle run ...`` ends with the
wrapper and the real message sits in its middle. When the bundle's code is imported by that command, an exception
hook prints the error under the wrappers first (``promptnucseg: ValueError: <message>``), then the usual
traceback, then the same line again.
"""

from __future__ import annotations

import sys
import traceback
from types import TracebackType

PREFIX = "promptnucseg: "


WRAPPERS = ("Failed to evaluate", "Failed to instantiate", "Failed to run")  # MONAI's wrapping messages


def real_error(error: BaseException) -> BaseException:
    """The error under MONAI's wrappers: follow ``__cause__`` (else ``__context__``) while the error is a
    ``RuntimeError`` whose message starts with one of :data:`WRAPPERS`."""
    seen = {id(error)}
    while isinstance(error, RuntimeError) and str(error).startswith(WRAPPERS):
        inner = error.__cause__ or error.__context__
        if inner is None or id(inner) in seen:
            break
        seen.add(id(inner))
        error = inner
    return error


def summary_line(error: BaseException) -> str:
    """``promptnucseg: <Type>: <first line of the message>`` of the error under MONAI's wrappers."""
    cause = real_error(error)
    message = str(cause).strip().splitlines()
    return f"{PREFIX}{type(cause).__name__}: {message[0] if message else ''}".rstrip()


def _hook(kind: type[BaseException], error: BaseException, tb: TracebackType | None) -> None:
    if isinstance(error, KeyboardInterrupt):
        sys.__excepthook__(kind, error, tb)
        return
    line = summary_line(error)
    print(line, file=sys.stderr)
    traceback.print_exception(kind, error, tb, file=sys.stderr)
    print(line, file=sys.stderr)


def install_for_bundle_cli() -> bool:
    """Install the hook when this process is ``python -m monai.bundle`` (True when installed); otherwise leave
    ``sys.excepthook`` alone."""
    program = sys.argv[0].replace("\\", "/") if sys.argv else ""
    if not program.endswith("monai/bundle/__main__.py"):
        return False
    sys.excepthook = _hook
    return True
