"""A set of MiB numbers of guest-physical memory, one byte each where guest RAM lies."""

from __future__ import annotations

from typing import Final

DENSE_MIBS: Final = 1 << 22
"""The MiB numbers kept one byte each: the first 4 TiB of guest-physical memory (the most
RAM a VM has and the 4 GiB below it), in at most 4 MiB grown as needed; any above (an
address no simulated kernel hands out) sits in a set."""


class MiBSet:
    """The chunk-aligned MiBs ballooned whole: a byte each, not a Python integer in a set,
    so that a balloon of most of a large VM's RAM takes a few MiB of the simulator's."""

    __slots__ = ("_dense", "_dense_count", "_sparse")

    def __init__(self) -> None:
        self._dense = bytearray()
        self._dense_count = 0
        self._sparse: set[int] = set()

    def __len__(self) -> int:
        return self._dense_count + len(self._sparse)

    def __bool__(self) -> bool:
        return bool(self._dense_count or self._sparse)

    def __contains__(self, index: int) -> bool:
        if index < DENSE_MIBS:
            return index < len(self._dense) and self._dense[index] == 1
        return index in self._sparse

    def add(self, index: int) -> None:
        """Add MiB number ``index`` (not negative)."""
        if index >= DENSE_MIBS:
            self._sparse.add(index)
            return
        dense = self._dense
        if index >= len(dense):
            dense.extend(bytes(min(max(index + 1, 2 * len(dense)), DENSE_MIBS) - len(dense)))
        if not dense[index]:
            dense[index] = 1
            self._dense_count += 1

    def remove(self, index: int) -> None:
        """Remove MiB number ``index``, which must be in the set.

        Raises:
            KeyError: it is not.
        """
        if index >= DENSE_MIBS:
            self._sparse.remove(index)
            return
        if index not in self:
            raise KeyError(index)
        self._dense[index] = 0
        self._dense_count -= 1

    def clear(self) -> None:
        """Remove every MiB number (the bytes go too)."""
        self._dense = bytearray()
        self._dense_count = 0
        self._sparse.clear()
