"""Consolidation: merge the oldest points of a chain into a synthetic full at a later point.

One pass per disk: the restore planner collapses the chain up to the target
point into one extent map (newest wins), each data frame is read and verified
once, its live slices are checksummed (and compressed like the target's
stream) in a worker pool and written in offset order by the set's
``StreamWriter`` into ``<disk>.full.<point>.data``. Whole frames that lie back
to back in one source file (most of an old full) are copied as they are
stored: one ``preadv`` per run of up to :data:`RUN_BYTES` into a recycled
buffer, each frame checked once there, one write per run
(``StreamWriter.add_stored``). The new stream is written by one helper thread
through the page cache, in order (it also computes the whole-file digest), its
writeback started as it grows, then one fsync and the rename; a run's buffer is
used again once the writer thread is past its writes. Its frames, chained digest and index are those of a
normal full. The new full keeps the
target's name, checkpoint and time, so the incs after it still name it as
their parent and the libvirt checkpoints stay untouched: the next inc
continues the chain. Crash safety: :mod:`virtnbd.retention.journal`.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any, BinaryIO, cast

import xxhash

from virtnbd import __version__, errors, fsutil
from virtnbd.backupset import encrypted, naming
from virtnbd.backupset import manifest as bsmanifest
from virtnbd.backupset.api import BackupSet, open_set
from virtnbd.backupset.manifest import DiskEntry, Manifest, Point
from virtnbd.restore.plan import Extent, Plan
from virtnbd.restore.run import build_plan
from virtnbd.restore.source import DiskChain, select
from virtnbd.retention import journal, layout
from virtnbd.stream import format as fmt
from virtnbd.stream.codec import Codec
from virtnbd.stream.format import EncodedFrame, StreamMeta
from virtnbd.stream.reader import STAGE_SLACK
from virtnbd.stream.writer import StreamWriter

log = logging.getLogger(__name__)

AHEAD = 8                   # reads (runs or frames) being checked/encoded ahead of the writer
RUN_BYTES = 4 << 20         # a run: stored frames lying back to back in one file, read and written with one call
WRITEBACK_EVERY = 64 << 20  # start the new stream's writeback (no wait) every this many bytes
WRITES_AHEAD = 4            # buffers handed to the new stream's writer thread, not written yet

# a frame, stored frames and their bytes, or a read buffer all items before it are slices of
Item = EncodedFrame | tuple[tuple[EncodedFrame, ...], memoryview] | bytearray


def _stream_set(folder: str) -> BackupSet:
    """The set to consolidate: only kinds with a consolidation here (stream sets; qcow2 sets: next)."""
    bset = open_set(folder)
    if bset.kind not in CONSOLIDATES:
        raise errors.BackupSetError(path=str(folder), reason=f"{bset.kind} sets cannot be consolidated "
                                                             f"(kinds that can: {', '.join(CONSOLIDATES)})")
    return bset


CONSOLIDATES = ("stream", encrypted.KIND)


@dataclass(frozen=True)
class Result:
    point: str                  # the new full's name (= the target point)
    merged: tuple[str, ...]     # points it replaces (target included)
    removed: tuple[str, ...]    # other points dropped in the same manifest swap
    stored_before: int
    stored_after: int


def _whole(ext: Extent) -> bool:
    frame = cast(Any, ext.frame)
    return ext.skip == 0 and ext.length == frame.length


def _copy(reader: Any, ext: Extent, codec: Codec, method: int) -> EncodedFrame:
    """A whole source frame: its stored bytes unchanged when the target may hold them (no compression, or
    the target's), after the reader checked them; else encoded again."""
    head, stored, data = reader.read_stored(ext.frame)
    if head.method not in (fmt.METHOD_NONE, method) or head.flags:
        return codec.encode_data(ext.start, data)
    return EncodedFrame("data", head.offset, head.length, head.raw, stored, codec.stored_checksum(head, stored))


class _Buffers:
    """Read buffers of runs, used again once the writer thread wrote what was read into them (a fresh
    buffer per run costs page faults on every read)."""

    def __init__(self, keep: int) -> None:
        self._free: list[bytearray] = []
        self._keep = keep
        self._lock = threading.Lock()

    def get(self, size: int) -> bytearray:
        with self._lock:
            while self._free:
                buf = self._free.pop()
                if len(buf) >= size:
                    return buf
        return bytearray(max(size, RUN_BYTES + STAGE_SLACK))

    def put(self, buf: bytearray) -> None:
        with self._lock:
            if len(self._free) < self._keep:
                self._free.append(buf)


def _copy_run(reader: Any, run: Sequence[Extent], codec: Codec, method: int, buffers: _Buffers) -> list[Item]:
    """Whole frames lying (nearly) back to back in one source file: one ``preadv`` into a recycled
    buffer, each frame checked once; frames the target may hold as they are go out as stored bytes,
    one slice per contiguous group; the buffer comes last (to recycle once its slices are written)."""
    if not hasattr(reader, "read_stored_batch"):
        return [_copy(reader, ext, codec, method) for ext in run]
    refs = [cast(Any, ext.frame) for ext in run]
    batch = [(r.pos, r.offset, r.length) for r in refs]
    buf = buffers.get(reader.batch_span(batch))
    view, frames = reader.read_stored_batch(batch, into=buf)
    out: list[Item] = []
    group: list[EncodedFrame] = []
    start = end = 0
    size = fmt.FRAME.size
    for rel, head, data in frames:
        if group and (rel != end or head.method not in (fmt.METHOD_NONE, method) or head.flags):
            out.append((tuple(group), view[start:end]))
            group = []
        if head.method not in (fmt.METHOD_NONE, method) or head.flags:
            out.append(codec.encode_data(head.offset, data))
            continue
        if not group:
            start = rel
        end = rel + size + head.stored
        stored = view[rel + size:end]
        group.append(EncodedFrame("data", head.offset, head.length, head.raw, stored,
                                  codec.stored_checksum(head, stored)))
    if group:
        out.append((tuple(group), view[start:end]))
    if view.obj is buf:
        out.append(buf)
    else:                       # read elsewhere (a store object without a descriptor): not used
        buffers.put(buf)
    return out


def _runs(extents: Sequence[Extent], copy: bool) -> Iterator[list[Extent]]:
    """The extents in order, whole frames of one layer that follow each other in its file grouped into
    runs of at most :data:`RUN_BYTES` (only when stored frames may be copied)."""
    run: list[Extent] = []
    for ext in extents:
        if run and copy and _whole(ext) and _follows(run, ext):
            run.append(ext)
            continue
        if run:
            yield run
        run = [ext]
    if run:
        yield run


def _follows(run: Sequence[Extent], ext: Extent) -> bool:
    last, first, ref = cast(Any, run[-1].frame), cast(Any, run[0].frame), cast(Any, ext.frame)
    return (_whole(run[-1]) and ext.layer == run[-1].layer
            and 0 < ref.pos - last.pos <= fmt.FRAME.size + last.length + STAGE_SLACK
            and ref.pos + fmt.FRAME.size + ref.length - first.pos <= RUN_BYTES)


def _frames(plan: Plan, readers: Sequence[Any], codec: Codec, pool: ThreadPoolExecutor,
            method: int | None = None, *, buffers: _Buffers | None = None) -> Iterator[Future[list[Item]]]:
    """Encoded frames of the plan's data extents, in offset order; each source frame decoded once.

    ``method``: the target's compression code when stored frames may be copied as they are (a set
    without extra codec stages: an encrypted set seals every frame again under the new stream's key);
    whole frames then go in runs (:func:`_copy_run`), read into ``buffers``."""
    extents = [e for e in plan.extents if not e.is_zero]
    uses = Counter((e.layer, cast(Any, e.frame).pos) for e in extents)
    buffers = buffers or _Buffers(0)
    decoded: dict[tuple[Any, int], Future[bytes]] = {}

    def encode(ext: Extent, source: Future[bytes]) -> list[Item]:
        data = memoryview(source.result())
        return [codec.encode_data(ext.start, data[ext.skip:ext.skip + ext.length])]

    window: deque[tuple[list[Extent], Future[list[Item]]]] = deque()
    todo = _runs(extents, method is not None)

    def submit(job: list[Extent]) -> None:
        ext = job[0]
        reader = readers[cast(int, ext.layer)]
        if method is not None and _whole(ext):
            window.append((job, pool.submit(_copy_run, reader, job, codec, method, buffers)))
            return
        key = (ext.layer, cast(Any, ext.frame).pos)
        if key not in decoded:
            decoded[key] = pool.submit(reader.read, ext.frame)
        window.append((job, pool.submit(encode, ext, decoded[key])))

    for job in todo:
        submit(job)
        if len(window) >= AHEAD:
            break
    while window:
        job, fut = window.popleft()
        yield fut
        for ext in job:
            key = (ext.layer, cast(Any, ext.frame).pos)
            uses[key] -= 1
            if not uses[key]:
                decoded.pop(key, None)
        nxt = next(todo, None)
        if nxt is not None:
            submit(nxt)


class _Writeback:
    """The new stream's file, written in order by one helper thread through the page cache (the
    caller goes on checking and handing over the next run meanwhile; at most :data:`WRITES_AHEAD`
    buffers wait), its writeback started (no wait, by a second helper) every :data:`WRITEBACK_EVERY`
    bytes so the final fsync has little left. Buffers handed to :meth:`write` must not change
    afterwards. A store object without a file descriptor (e.g. an S3 upload) is written as it is.
    Errors of a write come out of a later :meth:`write` or :meth:`flush`. The whole-file digest is
    computed by the writer thread too, over the bytes it writes, in order."""

    hashes_data = True      # StreamWriter leaves the whole-file digest to this file (see hexdigest)

    def __init__(self, f: Any) -> None:
        self._f = f
        self._digest = xxhash.xxh3_128()
        try:
            self._fd: int | None = f.fileno()
        except (OSError, AttributeError, ValueError):
            self._fd = None
        self._dirty = 0
        self._writes: deque[Future[Any]] = deque()
        self._kick: Future[None] | None = None
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="consolidate-write")
        self._kicker = ThreadPoolExecutor(1, thread_name_prefix="consolidate-writeback")

    def __enter__(self) -> _Writeback:
        return self

    def __exit__(self, *exc: object) -> None:
        self._writer.shutdown(wait=True)
        self._kicker.shutdown(wait=True)

    def _put(self, data: bytes | bytearray | memoryview) -> None:
        self._digest.update(data)
        self._f.write(data)

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self._fd is None:
            self._put(data)
            return len(data)
        while len(self._writes) >= WRITES_AHEAD:
            self._writes.popleft().result()
        self._writes.append(self._writer.submit(self._put, data))
        self._dirty += len(data)
        if self._dirty >= WRITEBACK_EVERY and (self._kick is None or self._kick.done()):
            self._kick = self._kicker.submit(fsutil.sync_file_range, self._fd, 0, 0, fsutil.SFR_WRITE)
            self._dirty = 0
        return len(data)

    def after_writes(self, fn: Callable[[bytearray], None], buf: bytearray) -> None:
        """``fn(buf)`` once every write handed over so far is done (the writer thread goes in order)."""
        if self._fd is None:
            fn(buf)
        else:
            self._writer.submit(fn, buf)

    def hexdigest(self) -> str:
        """The xxh3-128 of everything written (StreamWriter's file digest); after :meth:`flush`."""
        return self._digest.hexdigest()

    def flush(self) -> None:
        while self._writes:
            self._writes.popleft().result()
        if self._kick is not None:
            self._kick.result()
        self._f.flush()


def write_full(bset: BackupSet, chain: DiskChain, target: Point, merged: Sequence[str], workers: int) -> DiskEntry:
    """Write the synthetic full stream of one disk; returns its manifest entry (file not listed yet)."""
    name = naming.synthetic_full_file(chain.disk, target.name)
    path = bset.store.describe(name)
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        plan, readers = build_plan(chain, stack)
        newest = readers[-1].meta
        meta = StreamMeta(virtual_size=plan.virtual_size, disk=chain.disk, disk_format=newest.disk_format,
                          level="full", checkpoint=target.checkpoint, parent=None, time=target.time,
                          compression=newest.compression, tool_version=__version__,
                          extra=MappingProxyType({"consolidated_from": list(merged)}))
        meta, stages = bset.writing(meta, name)          # an encrypted set: a new salt, sealed frames
        buffers = _Buffers(AHEAD + WRITES_AHEAD + 2)
        with bset.create_data(name) as f, _Writeback(f) as out, \
                ThreadPoolExecutor(max(1, workers), thread_name_prefix="consolidate") as pool:
            writer = StreamWriter(cast(BinaryIO, out), meta, path=path, stages=stages)
            copy = None if stages else fmt.METHOD_CODES[meta.compression]
            for fut in _frames(plan, readers, writer.codec, pool, copy, buffers=buffers):
                for item in fut.result():
                    if isinstance(item, EncodedFrame):
                        writer.add(item)
                    elif isinstance(item, tuple):
                        writer.add_stored(*item)
                    else:
                        out.after_writes(buffers.put, item)
            totals = writer.finish()
    old = target.disks.get(chain.disk)
    extra = {k: v for k, v in (old.extra if old else {}).items() if k in ("image_info", "bus", "source")}
    extra.update({"mode": "full", "consolidated_from": list(merged)})
    log.info("%s: synthetic full %s: %d data bytes, %d stored, written in %.2f s", chain.disk, name,
             totals.data_bytes, totals.stored_bytes, time.monotonic() - started)
    return bsmanifest.disk_entry(meta, name, totals, extra)


def _stored(points: Sequence[Point]) -> int:
    return sum(d.stored_bytes for p in points for d in p.disks.values())


def merge_range(manifest: Manifest, target: str, drop: Sequence[str] = ()) -> tuple[list[Point], list[Point]]:
    """(points merged into the target, target last; other points removed). Checks the request."""
    point = manifest.point(target)
    if point is None:
        raise errors.ChainError(reason=f"no point {target!r} in the chain")
    if point.level not in ("full", "inc"):
        raise errors.ChainError(reason=f"point {target} is a {point.level}: consolidate into a full or inc point")
    index = manifest.points.index(point)
    before = list(manifest.points[:index])
    merged = [p for p in before if p.level in ("full", "inc")] + [point]
    orphans = [p.name for p in before if p.level not in ("full", "inc") and p.name not in drop]
    if orphans:
        raise errors.ChainError(reason=f"point(s) {', '.join(orphans)} depend on points being merged; "
                                       "remove them first (a retention policy that does not keep them)")
    later = {p.parent for p in manifest.points[index + 1:] if p.parent is not None}
    lost = sorted(later & {p.name for p in merged[:-1]})
    if lost:
        raise errors.ChainError(reason=f"later points need {', '.join(lost)}, which would be merged")
    others = [p for p in manifest.points if p.name in drop and p not in merged]
    return merged, others


def consolidate(folder: str, target: str, drop: Sequence[str] = (), workers: int = 4) -> Result:
    """Merge every point up to ``target`` into a synthetic full at ``target``; also drop ``drop``.

    The caller holds the set's lock and ran :func:`journal.recover` first.
    """
    bset = _stream_set(folder)
    manifest = bset.manifest()
    if manifest is None:
        raise errors.BackupSetError(path=str(folder), reason="no manifest: not a virtnbd backup set")
    merged, others = merge_range(manifest, target, drop)
    point = merged[-1]
    if len(merged) == 1 and point.level == "full" and not others:
        log.info("%s: %s is already a full: nothing to consolidate", folder, target)
        return Result(target, (), (), _stored(manifest.points), _stored(manifest.points))
    names = [p.name for p in merged]
    selection = select(folder, target, None)
    new_files = {naming.synthetic_full_file(d.disk, target) for d in selection.disks}
    keep = [p for p in manifest.points if p not in merged and p not in others]
    still = layout.listed_files(replace(manifest, points=tuple(keep)))
    still |= layout.point_files(point) - {d.file for d in point.disks.values()}   # side files the full keeps
    old_files = set().union(*(layout.point_files(p) for p in merged + others)) - still - new_files
    store = bset.store
    journal.begin(store, new_files | old_files, f"consolidate {', '.join(names)} into a full at {target}")
    try:
        disks = {chain.disk: write_full(bset, chain, point, names, workers) for chain in selection.disks}
        now = dt.datetime.now(dt.UTC).astimezone().isoformat(timespec="seconds")
        full = replace(point, level="full", parent=None, disks=MappingProxyType(disks),
                       extra=MappingProxyType({**point.extra, "consolidated": {"from": names, "at": now}}))
        updated = bsmanifest.rewrite(store, manifest, (full, *keep), encrypted.manifest_key(bset))
    except BaseException:
        journal.recover(store)       # roll back: the manifest still lists the old points
        raise
    for p in merged[:-1]:
        log.info("point %s merged into the synthetic full at %s", p.name, target)
    for p in others:
        log.info("point %s removed with the consolidation (no rule keeps it)", p.name)
    started = time.monotonic()
    gone = journal.remove_unlisted(store, old_files, "its point was merged or removed")
    log.info("removed %d file(s) of merged or removed points in %.2f s", len(gone), time.monotonic() - started)
    journal.finish(store)
    return Result(target, tuple(names), tuple(p.name for p in others), _stored(manifest.points),
                  _stored(updated.points))
