"""Errors a user can act on, and the range check every numeric flag goes through."""

from typing import Any, Callable, Mapping

#: the ranges a numeric flag can be declared with, as the error message states them
RANGES: dict[str, Callable[[Any], bool]] = {
    "> 0": lambda v: v > 0,
    ">= 0": lambda v: v >= 0,
    ">= 1": lambda v: v >= 1,
    "in [0, 1]": lambda v: 0 <= v <= 1,
    "in (0, 1]": lambda v: 0 < v <= 1,
    "in [0, 1)": lambda v: 0 <= v < 1,
    "in [0, 0.5)": lambda v: 0 <= v < 0.5,
}


class UserError(ValueError):
    """Raised with a one-line message saying where and what; the CLI prints it without a traceback."""


class NonFiniteError(UserError):
    """A loss, gradient, score or advantage became NaN or infinite during training."""


def check_ranges(section: str, values: Mapping[str, Any], ranges: Mapping[str, str]) -> None:
    """Raise a UserError naming the flag (`--section.name`, or `--name` without a section) of the first value
    outside its range; None passes."""
    for name, rule in ranges.items():
        value = values[name]
        if value is not None and (isinstance(value, bool) or not RANGES[rule](value)):
            raise UserError(f"--{section + '.' if section else ''}{name} {value}: must be {rule}")
