"""Option values as they arrive from the command line (``--key value``: MONAI passes text) and from MONAI Label's
``--conf``: converted strictly, and a wrong value is an error naming the option."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

TRUE_WORDS = ("true", "yes", "1")
FALSE_WORDS = ("false", "no", "0")


def as_bool(value: Any, name: str) -> bool:
    """``value`` as a bool: a bool, 0 / 1, or ``true/false/yes/no/1/0`` in any case; anything else is an error.

    Raises:
        ValueError: naming the option ``name`` and the value it got.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in TRUE_WORDS + FALSE_WORDS:
        return value.strip().lower() in TRUE_WORDS
    raise ValueError(f"{name} must be true or false (also yes/no, 1/0), got {value!r}")


def as_number(value: Any, name: str, kind: type, minimum: float | None = None, optional: bool = False) -> Any:
    """``value`` as ``kind`` (int or float), at least ``minimum``; None (or ``"none"``/``"null"``) when ``optional``.

    Raises:
        ValueError: naming the option ``name`` and the value it got.
    """
    if optional and (value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", ""))):
        return None
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:
        number = kind(float(value)) if kind is int and not isinstance(value, int) else kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be {'an integer' if kind is int else 'a number'}, got {value!r}") from None
    if kind is int and float(value) != number:
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if kind is float and not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if minimum is not None and number < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value!r}")
    return number


def as_file(value: Any, name: str, what: str = "file") -> str:
    """``value`` as the path of an existing local file (``what`` says what it holds, for the messages).

    Raises:
        ValueError: no path given (None, ``"none"``, empty), naming the option ``name``.
        FileNotFoundError: naming the option and the path that does not exist (nothing is downloaded).
    """
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
        raise ValueError(f"{name} is not set: pass --{name} <path of the {what}>")
    if not Path(value).is_file():
        raise FileNotFoundError(f"{name}: {what} not found: {value} (give a local file; nothing is downloaded)")
    return str(value)
