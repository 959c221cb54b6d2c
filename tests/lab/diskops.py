"""qemu-io operations on a disk, described as data: what to write where, and the bytes it leaves.

The same :class:`Op` is applied to a running domain (monitor qemu-io), to an
image file (qemu-io) and to a raw shadow image, so expected bytes are known.
"""
from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.lab.common import KiB, LabError

ALIGN = 64 * KiB
# While a backup job runs QEMU drops discards: use these kinds then.
JOB_SAFE_KINDS = ("data", "data", "data", "pattern", "zero")


@dataclass(frozen=True)
class Op:
    """One qemu-io operation. kind: data | pattern | zero | discard."""

    kind: str
    offset: int
    length: int
    pattern: int = 0  # for kind="pattern"
    seed: int = 0  # for kind="data": bytes = random.Random(seed).randbytes(length)

    def data(self) -> bytes:
        if self.kind == "data":
            return random.Random(self.seed).randbytes(self.length)
        if self.kind == "pattern":
            return bytes([self.pattern]) * self.length
        return bytes(self.length)  # zero and discard read back as zeros

    @property
    def end(self) -> int:
        return self.offset + self.length


def data_op(offset: int, length: int, seed: int) -> Op:
    return Op("data", offset, length, seed=seed)


def pattern_op(offset: int, length: int, pattern: int) -> Op:
    return Op("pattern", offset, length, pattern=pattern)


def zero_op(offset: int, length: int) -> Op:
    return Op("zero", offset, length)


def discard_op(offset: int, length: int) -> Op:
    return Op("discard", offset, length)


def random_writes(
    seed: int,
    n: int,
    size: int,
    *,
    align: int = ALIGN,
    max_blocks: int = 8,
    kinds: Sequence[str] = ("data", "data", "data", "pattern", "zero", "discard"),
) -> list[Op]:
    """``n`` deterministic ops (same seed -> same list) at ``align``-ed offsets inside ``size``.

    While a backup job runs use ``kinds=JOB_SAFE_KINDS`` (QEMU drops discards then).
    """
    rng = random.Random(seed)
    blocks = size // align
    ops = []
    for _ in range(n):
        nblocks = rng.randint(1, min(max_blocks, blocks))
        start = rng.randrange(0, blocks - nblocks + 1)
        kind = rng.choice(list(kinds))
        off, length = start * align, nblocks * align
        if kind == "data":
            ops.append(data_op(off, length, rng.getrandbits(32)))
        elif kind == "pattern":
            ops.append(pattern_op(off, length, rng.randrange(1, 256)))
        else:
            ops.append(Op(kind, off, length))
    return ops


def ranges_of(ops: Sequence[Op]) -> list[tuple[int, int]]:
    """Union of the byte ranges ops touch, as sorted non-overlapping (offset, length)."""
    spans = sorted((op.offset, op.end) for op in ops)
    merged: list[list[int]] = []
    for start, end in spans:
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(s, e - s) for s, e in merged]


def ranges_cover(outer: Sequence[tuple[int, int]], inner: Sequence[tuple[int, int]]) -> bool:
    """True when every byte of the ``inner`` (offset, length) ranges lies in ``outer``."""
    merged = ranges_of([Op("zero", off, length) for off, length in outer])
    for off, length in inner:
        if length and not any(s <= off and off + length <= s + n for s, n in merged):
            return False
    return True


def qemu_io_command(op: Op, data_file: Path | None) -> str:
    if op.kind == "data":
        assert data_file is not None
        return f"write -s {data_file} {op.offset} {op.length}"
    if op.kind == "pattern":
        return f"write -P {op.pattern:#x} {op.offset} {op.length}"
    if op.kind == "zero":
        return f"write -z {op.offset} {op.length}"
    if op.kind == "discard":
        return f"discard {op.offset} {op.length}"
    raise ValueError(f"unknown op kind {op.kind!r}")


def done_line(op: Op) -> str:
    verb = "discard" if op.kind == "discard" else "wrote"
    return f"{verb} {op.length}/{op.length} bytes at offset {op.offset}"


def check_qemu_io_output(op: Op, cmd: str, out: str) -> None:
    if done_line(op) not in out or "failed" in out:
        raise LabError(f"qemu-io {cmd!r} failed: {out.strip()!r}")
