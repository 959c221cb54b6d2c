"""One stream's frame index kept compactly: three ``array('Q')`` and one ``bytes``.

A ``FrameRef`` per frame costs ~200 bytes of Python objects; a table costs 25
bytes per frame, so the index of a 1M-frame stream stays ~25 MiB. Lookups are
binary searches (``bisect``) on the frame starts.
"""
from __future__ import annotations

import bisect
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
_CHUNK = 1 << 16          # index entries converted at a time (bounded temporary memory)


@dataclass(frozen=True)
class FrameTable:
    path: str
    starts: array          # disk offset of each frame, ascending
    ends: array            # starts[i] + length
    pos: array             # file position of each frame header
    kinds: bytes           # fmt.KIND_DATA | fmt.KIND_ZERO per frame

    def __len__(self) -> int:
        return len(self.starts)

    def at_or_after(self, offset: int) -> int:
        """Index of the frame holding ``offset``, else of the first frame after it (may be len)."""
        i = bisect.bisect_right(self.starts, offset) - 1
        if i >= 0 and self.ends[i] > offset:
            return i
        return i + 1

    def kind(self, i: int) -> str:
        return KINDS[self.kinds[i]]

    def ref(self, i: int) -> FrameRef:
        return FrameRef(self.kind(i), self.starts[i], self.ends[i] - self.starts[i], self.pos[i])


def _check(table: FrameTable, virtual_size: int, where: int) -> FrameTable:
    """Frames in order, non-overlapping, inside the disk; else FormatError (the index is damaged)."""
    starts, ends = table.starts, table.ends
    ok = (not table.kinds.translate(None, bytes(KINDS))
          and all(map(operator.lt, starts, ends))
          and all(map(operator.ge, starts[1:], ends))
          and all(map(operator.lt, table.pos, table.pos[1:]))
          and (not ends or ends[-1] <= virtual_size))
    if not ok:
        raise errors.FormatError(path=table.path, offset=where, reason="invalid index entry")
    return table


def from_index(path: str, entries: bytes, virtual_size: int, index_pos: int) -> FrameTable:
    """Table from the raw index entries of a virtnbd stream (``StreamReader.index_entries``)."""
    width = fmt.INDEX_ENTRY.size // 8
    starts, ends, pos = array("Q"), array("Q"), array("Q")
    view = memoryview(entries)
    for at in range(0, len(entries), _CHUNK * fmt.INDEX_ENTRY.size):
        words = array("Q")
        words.frombytes(view[at:at + _CHUNK * fmt.INDEX_ENTRY.size])
        if sys.byteorder != "little":
            words.byteswap()
        first = words[1::width]
        starts.extend(first)
        ends.extend(map(operator.add, first, words[2::width]))
        pos.extend(words[3::width])
    return _check(FrameTable(path, starts, ends, pos, bytes(entries[0::fmt.INDEX_ENTRY.size])),
                  virtual_size, index_pos)


def from_refs(path: str, refs: Sequence[FrameRef], virtual_size: int) -> FrameTable:
    """Table from FrameRefs (virtnbdbackup streams and raw images, whose readers list them)."""
    table = FrameTable(path, array("Q", (r.offset for r in refs)), array("Q", (r.offset + r.length for r in refs)),
                       array("Q", (r.pos for r in refs)), bytes(_CODES[r.kind] for r in refs))
    return _check(table, virtual_size, 0)
