"""Argument types shared by the ``propseg`` subcommands (one definition each).

Two kinds:

* argparse ``type=`` callables (a bad value is a usage error, exit code 2):
  :func:`non_negative_float`, :func:`image_weight`, :func:`int_at_least` /
  :data:`non_negative_int`, :func:`k_or_all`, :func:`fraction`;
* parsers of comma-separated option values, called after parsing with the option's name
  (a bad value raises :class:`~napari_propseg.errors.InputError`, exit code 2 with one
  sentence): :func:`parse_ids`, :func:`int_list`, :func:`str_list`, :func:`shape3`.
"""
from __future__ import annotations

import argparse
import math

from ..errors import InputError

# --------------------------------------------------------------------------- argparse types


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(v) and v >= 0):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return v


def image_weight(text: str) -> str | float:
    """argparse type of --appearance: ``auto`` or a finite number >= 0."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return non_negative_float(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected auto or a finite number >= 0, got {text!r}") from None


def int_at_least(minimum: int):
    """argparse type factory: a whole number >= ``minimum`` (anything else: usage error, exit 2)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is too small; give {minimum} or more")
        return value

    return parse


non_negative_int = int_at_least(0)


def k_or_all(text: str):
    """argparse type of a slice count that may be ``all``: a whole number or ``"all"``."""
    if text.strip().lower() == "all":
        return "all"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a whole number nor 'all'") from None


def fraction(text: str) -> float:
    """argparse type: a number between 0 and 1 (inclusive)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number between 0 and 1") from None
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not between 0 and 1")
    return v


# --------------------------------------------------------------------------- comma-separated values


def parse_ids(text: str | None, what: str) -> list[int]:
    """``"12, 40,77"`` -> ``[12, 40, 77]`` (slice indices, label ids; None -> ``[]``).

    Raises:
        InputError: anything but comma-separated non-negative integers.
    """
    if text is None:
        return []
    try:
        values = [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise InputError(f"{what} {text!r} is not a comma-separated list of integers; write e.g. 12,40,77.") from None
    if any(v < 0 for v in values):
        raise InputError(f"{what} {text!r} holds a negative number; slice indices and label ids start at 0.")
    return values


def int_list(text: str, what: str) -> list[int]:
    """``"3,5,9"`` -> ``[3, 5, 9]`` (any whole numbers, at least one).

    Raises:
        InputError: not whole numbers, or nothing given.
    """
    try:
        vals = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise InputError(f"{what} {text!r} is not a comma-separated list of whole numbers, e.g. 3,5,9,17.") from None
    if not vals:
        raise InputError(f"{what} is empty; pass comma-separated whole numbers.")
    return vals


def str_list(text: str) -> list[str]:
    """``"a, b,,c"`` -> ``["a", "b", "c"]``."""
    return [v.strip() for v in str(text).split(",") if v.strip()]


def shape3(text: str, what: str) -> tuple[int, int, int]:
    """``"129,512,512"`` -> ``(129, 512, 512)``: three sizes Z,Y,X of at least 2 voxels.

    Raises:
        InputError: not three whole numbers >= 2.
    """
    vals = int_list(text, what)
    if len(vals) != 3 or min(vals) < 2:
        raise InputError(f"{what} {text!r} must be three sizes Z,Y,X of at least 2 voxels, e.g. 129,512,512.")
    return tuple(vals)  # type: ignore[return-value]
