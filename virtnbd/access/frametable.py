"""One stream's frame index kept compactly: three ``array('Q')`` and one ``bytes``.

A ``FrameRef`` per frame costs ~200 bytes of Python objects; a table costs 25
bytes per frame, so the index of a 1M-frame stream stays ~25 MiB. Lookups are
binary searches (``bisect``) on the frame starts.
"""
from __future__ import annotations

import bisect
import itertools
import operator
import sys
from array import array
from collections.abc import Sequence
from dataclasses import dataclass

from virtnbd import errors
from virtnbd.stream import format as fmt
from virtnbd.stream.format import FrameRef

KINDS = {fmt.KIND_DATA: "data", fmt.KIND_ZERO: "zero"}
_CODES = {name: code for code, name in KINDS.items()}
_IS_DATA = bytes(int(code == fmt.KIND_DATA) for code in range(256))   # kinds -> 1 for data, 0 else
_CHUNK = 1 << 16          # index entries converted at a time (bounded temporary memory)


@dataclass(frozen=True)
class FrameTable:
    path: str
    starts: array          # disk offset of each frame, ascending
    lengths: array         # disk bytes each frame covers
    pos: array             # file position of each frame header
    kinds: bytes           # fmt.KIND_DATA | fmt.KIND_ZERO per frame

    def __len__(self) -> int:
        return len(self.starts)

    def at_or_after(self, offset: int) -> int:
        """Index of the frame holding ``offset``, else of the first frame after it (may be len)."""
        i = bisect.bisect_right(self.starts, offset) - 1
        if i >= 0 and self.starts[i] + self.lengths[i] > offset:
            return i
        return i + 1

    def end(self, i: int) -> int:
        return int(self.starts[i] + self.lengths[i])

    def kind(self, i: int) -> str:
        return KINDS[self.kinds[i]]

    def ref(self, i: int) -> FrameRef:
        return FrameRef(self.kind(i), self.starts[i], self.lengths[i], self.pos[i])

    def longest_data(self) -> int:
        """Length of the longest data frame (0: none)."""
        return max(itertools.compress(self.lengths, self.kinds.translate(_IS_DATA)), default=0)


def _check(table: FrameTable, virtual_size: int, where: int) -> FrameTable:
    """Frames in order, non-overlapping, inside the disk; else FormatError (the index is damaged).

    A wrong file position needs no check here: ``read`` compares the frame header it finds
    there with the index entry."""
    starts, lengths = table.starts, table.lengths
    ok = (not table.kinds.translate(None, bytes(KINDS))
          and (not lengths or min(lengths) > 0)
          and all(map(operator.le, map(operator.add, starts, lengths), starts[1:]))
          and (not starts or table.end(len(starts) - 1) <= virtual_size))
    if not ok:
        raise errors.FormatError(path=table.path, offset=where, reason="invalid index entry")
    return table


def from_index(path: str, entries: bytes, virtual_size: int, index_pos: int) -> FrameTable:
    """Table from the raw index entries of a virtnbd stream (``StreamReader.index_entries``)."""
    width = fmt.INDEX_ENTRY.size // 8
    starts, lengths, pos = array("Q"), array("Q"), array("Q")
    view = memoryview(entries)
    for at in range(0, len(entries), _CHUNK * fmt.INDEX_ENTRY.size):
        words = array("Q")
        words.frombytes(view[at:at + _CHUNK * fmt.INDEX_ENTRY.size])
        if sys.byteorder != "little":
            words.byteswap()
        starts.extend(words[1::width])
        lengths.extend(words[2::width])
        pos.extend(words[3::width])
    return _check(FrameTable(path, starts, lengths, pos, bytes(entries[0::fmt.INDEX_ENTRY.size])),
                  virtual_size, index_pos)


def from_refs(path: str, refs: Sequence[FrameRef], virtual_size: int) -> FrameTable:
    """Table from FrameRefs (virtnbdbackup streams and raw images, whose readers list them)."""
    table = FrameTable(path, array("Q", (r.offset for r in refs)), array("Q", (r.length for r in refs)),
                       array("Q", (r.pos for r in refs)), bytes(_CODES[r.kind] for r in refs))
    return _check(table, virtual_size, 0)
