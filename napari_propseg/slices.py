"""Slice pickers: which axial slices to take when k of them are wanted (core, no Qt).

Two schemes, each written once here:

* :func:`spread_slices` -- ``round(linspace(z_lo, z_hi, k))``, both ends of an extent
  included (the benchmarks' reference and start slices, PROTOCOL.md section 1);
* :func:`uniform_slices` -- the centres of k equal parts of ``[0, Z)``, half a step in from
  either end (the slices the reference networks label, ``propseg suggest``).
"""
from __future__ import annotations

import numpy as np

from .errors import InputError


def spread_slices(z_lo: int, z_hi: int, k: int) -> list[int]:
    """k evenly spaced slices over ``[z_lo, z_hi]``, both ends included, deduplicated.

    ``round(linspace(z_lo, z_hi, k))`` with numpy rounding (half to even); ``k == 1``
    takes the middle of the extent. The caller checks ``k >= 1``.

    Example:
        >>> spread_slices(5, 15, 3), spread_slices(0, 3, 1), spread_slices(0, 2, 5)
        ([5, 10, 15], [2], [0, 1, 2])
    """
    if k == 1:
        return [int(np.rint((z_lo + z_hi) / 2))]
    return sorted({int(z) for z in np.rint(np.linspace(z_lo, z_hi, k))})


def uniform_slices(n_slices: int, k: int) -> list[int]:
    """k slice indices at the centres of k equal parts of ``[0, Z)``.

    ``z_i = floor((i + 1/2) Z / k)``, i = 0..k-1: evenly spaced, half a step in from
    either end (the end slices rarely hold organs). ``k >= Z`` returns every slice.
    """
    if n_slices < 1:
        raise InputError("The volume has no slices; pass a 3-D image with at least one axial slice.")
    if k < 1:
        raise InputError(f"k must be a positive number of slices, got {k}; pass --k 1 or more.")
    if k >= n_slices:
        return list(range(n_slices))
    return sorted({int((i + 0.5) * n_slices / k) for i in range(k)})
