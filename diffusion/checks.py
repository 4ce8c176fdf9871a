"""One-line validation errors that name the setting, the bad value and what is allowed."""

from __future__ import annotations


def check_positive_int(name: str, value, group: str = "model") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{group} {name}={value!r} is invalid: it must be a positive integer")
    return value


def check_choice(name: str, value, allowed) -> str:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is invalid: allowed values are {', '.join(allowed)}")
    return value


def root_cause(exc: BaseException) -> BaseException:
    """Unwrap Hydra's InstantiationException chain down to the error the user's value caused."""
    while exc.__cause__ is not None and type(exc).__name__ == "InstantiationException":
        exc = exc.__cause__
    return exc
