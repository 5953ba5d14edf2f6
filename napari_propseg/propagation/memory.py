"""Bounded memory bank for one propagation pass.

STCN's inference memory grows by one frame every few frames and runs out of memory on long
sequences. Here the bank holds at most ``cap`` slices:

* anchors (corrected slices) are always kept and never evicted;
* every ``every``-th propagated slice is offered to the bank (:meth:`MemoryBank.wants`);
* when the bank is full, the oldest non-anchor entry is evicted.

So the memory read costs at most ``cap * h * w`` keys per query, whatever the volume length.

Example:
    >>> import torch
    >>> bank = MemoryBank(cap=3, every=2)
    >>> bank.add(0, torch.zeros(64, 4, 4), torch.zeros(2, 8, 4, 4), anchor=True)
    >>> for step, z in enumerate(range(1, 10), start=1):
    ...     if bank.wants(step):
    ...         bank.add(z, torch.zeros(64, 4, 4), torch.zeros(2, 8, 4, 4))
    >>> bank.slices, len(bank), bank.peak
    ([0, 6, 8], 3, 3)
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


@dataclass
class _Entry:
    z: int
    key: torch.Tensor  # Ck, h, w
    value: torch.Tensor  # K, Cv, h, w
    anchor: bool


class MemoryBank:
    """Anchors plus a capped, first-in-first-out set of propagated slices.

    Args:
        cap: maximum number of slices held (anchors included), >= 1.
        every: a propagated slice is stored every ``every`` steps (>= 1).

    Attributes:
        peak: largest number of entries ever held (for tests and benchmarks).
    """

    def __init__(self, cap: int = 16, every: int = 5) -> None:
        if int(cap) < 1:
            raise ValueError(f"memory cap must be >= 1, got {cap}")
        if int(every) < 1:
            raise ValueError(f"memory_every must be >= 1, got {every}")
        self.cap = int(cap)
        self.every = int(every)
        self._entries: list[_Entry] = []
        self.peak = 0
        self._cat: tuple[torch.Tensor, torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def slices(self) -> list[int]:
        """Slice indices held, oldest first."""
        return [e.z for e in self._entries]

    def wants(self, step: int) -> bool:
        """Whether the ``step``-th propagated slice of this pass (1-based) should be stored."""
        return step > 0 and step % self.every == 0

    def add(self, z: int, key: torch.Tensor, value: torch.Tensor, *, anchor: bool = False) -> None:
        """Store one slice, evicting the oldest non-anchor entry when full.

        Args:
            z: slice index.
            key: (Ck, h, w) key of the slice.
            value: (K, Cv, h, w) values of the K objects on it.
            anchor: anchors are never evicted.

        Raises:
            ValueError: the bank is full of anchors, or shapes differ from the entries held.
        """
        if self._entries:
            ref = self._entries[0]
            if key.shape != ref.key.shape or value.shape != ref.value.shape:
                raise ValueError(f"memory entry shapes {tuple(key.shape)}, {tuple(value.shape)} differ from the bank's {tuple(ref.key.shape)}, {tuple(ref.value.shape)}")
        if len(self._entries) >= self.cap:
            victims = [i for i, e in enumerate(self._entries) if not e.anchor]
            if not victims:
                raise ValueError(f"memory bank full of anchors (cap {self.cap}); raise memory_cap")
            dropped = self._entries.pop(victims[0])
            log.debug("memory: evicted slice %d for slice %d", dropped.z, z)
        self._entries.append(_Entry(int(z), key, value, bool(anchor)))
        self.peak = max(self.peak, len(self._entries))
        self._cat = None

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Stacked memory for :meth:`STCN.segment`.

        Returns:
            mk (1, Ck, T, h, w) and mv (1, K, Cv, T, h, w), T = ``len(self)``.
        """
        if not self._entries:
            raise ValueError("memory bank is empty")
        if self._cat is None:
            mk = torch.stack([e.key for e in self._entries], dim=1).unsqueeze(0)  # 1, Ck, T, h, w
            mv = torch.stack([e.value for e in self._entries], dim=2).unsqueeze(0)  # 1, K, Cv, T, h, w
            self._cat = (mk, mv)
        return self._cat
