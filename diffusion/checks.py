"""One-line validation errors that name the setting, the bad value and what is allowed."""

from __future__ import annotations

import math


def check_positive_int(name: str, value, group: str = "model") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{group} {name}={value!r} is invalid: it must be a positive integer")
    return value


def is_whole(value, floats: bool = True) -> bool:
    """Whether ``value`` is a whole number: an int (never a bool), or with ``floats`` also a finite float such as
    3.0 (what a page's number field sends)."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return floats and isinstance(value, float) and math.isfinite(value) and value.is_integer()


def check_whole(name: str, value, low: int, high: int, floats: bool = True, high_text: str | None = None) -> int:
    """A whole number in [low, high] as an int (with ``floats``, a float such as 3.0 too; without, "an integer"), or
    a one-line ValueError naming it and the range (``high_text`` shows the upper bound: ``T=1000``)."""
    if not is_whole(value, floats) or not low <= value <= high:
        kind = "a whole number" if floats else "an integer"
        raise ValueError(f"{name}={value!r} is invalid: it must be {kind} in [{low}, {high if high_text is None else high_text}]")
    return int(value)


def check_choice(name: str, value, allowed) -> str:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is invalid: allowed values are {', '.join(allowed)}")
    return value


def root_cause(exc: BaseException) -> BaseException:
    """Unwrap Hydra's InstantiationException chain down to the error the user's value caused."""
    while exc.__cause__ is not None and type(exc).__name__ == "InstantiationException":
        exc = exc.__cause__
    return exc
