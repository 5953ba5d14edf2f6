"""The runs of slices a (re)propagation fills: between two anchors, below the lowest, above
the highest (no torch). A re-propagation recomputes only the segments a changed slice touches."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

from ..errors import InputError


@dataclass(frozen=True)
class Segment:
    """A run of non-anchor slices and the anchor(s) it is propagated from.

    ``kind`` is ``"between"`` (slices ``lo+1 .. hi-1`` between anchors ``lo`` and ``hi``),
    ``"below"`` (slices ``0 .. hi-1`` under the lowest anchor ``hi``) or ``"above"``
    (slices ``lo+1 .. Z-1`` over the highest anchor ``lo``).
    """

    kind: str
    lo: int | None
    hi: int | None
    depth: int = field(compare=False, default=0)

    @property
    def slices(self) -> list[int]:
        if self.kind == "between":
            return list(range(self.lo + 1, self.hi))
        if self.kind == "below":
            return list(range(0, self.hi))
        return list(range(self.lo + 1, self.depth))


def all_segments(anchors: Sequence[int], depth: int) -> list[Segment]:
    """Segments covering every non-anchor slice of a ``depth``-slice volume."""
    segs = []
    if anchors[0] > 0:
        segs.append(Segment("below", None, anchors[0], depth))
    segs += [Segment("between", a, b, depth) for a, b in zip(anchors[:-1], anchors[1:]) if b - a > 1]
    if anchors[-1] < depth - 1:
        segs.append(Segment("above", anchors[-1], None, depth))
    return segs


def affected_segments(anchors: Sequence[int], changed: Iterable[int], depth: int) -> list[Segment]:
    """Segments to recompute after the slices ``changed`` were edited.

    A changed anchor affects the gaps to its neighbouring anchors, and the outward run
    when it is the lowest or highest anchor; a changed non-anchor slice (e.g. an anchor
    that was removed) affects the gap or outward run that contains it.
    """
    segs = all_segments(anchors, depth)
    out: list[Segment] = []
    for c in changed:
        c = int(c)
        if c < 0 or c >= depth:
            raise InputError(f"Changed slice {c} lies outside the volume's {depth} slices; pick slices 0..{depth - 1}.")
        for s in segs:
            touches = c in s.slices or c == s.lo or c == s.hi
            if touches and s not in out:
                out.append(s)
    return sorted(out, key=lambda s: s.slices[0])
