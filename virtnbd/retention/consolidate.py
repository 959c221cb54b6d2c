"""Consolidation: merge the oldest points of a chain into a synthetic full at a later point.

One pass per disk: the restore planner collapses the chain up to the target
point into one extent map (newest wins), each data frame is read and verified
once, its live slices are checksummed (and compressed like the target's
stream) in a worker pool and written in offset order by the set's
``StreamWriter`` into ``<disk>.full.<point>.data``. The new full keeps the
target's name, checkpoint and time, so the incs after it still name it as
their parent and the libvirt checkpoints stay untouched: the next inc
continues the chain. Crash safety: :mod:`virtnbd.retention.journal`.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import logging
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any, BinaryIO, cast

from virtnbd import __version__, errors
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
from virtnbd.stream.writer import StreamWriter

log = logging.getLogger(__name__)

AHEAD = 16          # extents being decoded/encoded ahead of the writer
STAGING_BLOCKS = 4  # the set's staged writer (O_DIRECT / pipelined writeback), 16 MiB


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


def _frames(plan: Plan, readers: Sequence[Any], codec: Codec, pool: ThreadPoolExecutor,
            method: int | None = None) -> Iterator[Future[EncodedFrame]]:
    """Encoded frames of the plan's data extents, in offset order; each source frame decoded once.

    ``method``: the target's compression code when stored frames may be copied as they are (a set
    without extra codec stages: an encrypted set seals every frame again under the new stream's key)."""
    extents = [e for e in plan.extents if not e.is_zero]
    uses = Counter((e.layer, cast(Any, e.frame).pos) for e in extents)
    decoded: dict[tuple[Any, int], Future[bytes]] = {}

    def encode(ext: Extent, source: Future[bytes]) -> EncodedFrame:
        data = memoryview(source.result())
        return codec.encode_data(ext.start, data[ext.skip:ext.skip + ext.length])

    window: deque[tuple[tuple[Any, int], Future[EncodedFrame]]] = deque()
    todo = iter(extents)

    def submit(ext: Extent) -> None:
        key = (ext.layer, cast(Any, ext.frame).pos)
        if method is not None and _whole(ext):
            window.append((key, pool.submit(_copy, readers[cast(int, ext.layer)], ext, codec, method)))
            return
        if key not in decoded:
            decoded[key] = pool.submit(readers[cast(int, ext.layer)].read, ext.frame)
        window.append((key, pool.submit(encode, ext, decoded[key])))

    for ext in todo:
        submit(ext)
        if len(window) >= AHEAD:
            break
    while window:
        key, fut = window.popleft()
        yield fut
        uses[key] -= 1
        if not uses[key]:
            decoded.pop(key, None)
        nxt = next(todo, None)
        if nxt is not None:
            submit(nxt)


def write_full(bset: BackupSet, chain: DiskChain, target: Point, merged: Sequence[str], workers: int) -> DiskEntry:
    """Write the synthetic full stream of one disk; returns its manifest entry (file not listed yet)."""
    name = naming.synthetic_full_file(chain.disk, target.name)
    path = bset.store.describe(name)
    with contextlib.ExitStack() as stack:
        plan, readers = build_plan(chain, stack)
        newest = readers[-1].meta
        meta = StreamMeta(virtual_size=plan.virtual_size, disk=chain.disk, disk_format=newest.disk_format,
                          level="full", checkpoint=target.checkpoint, parent=None, time=target.time,
                          compression=newest.compression, tool_version=__version__,
                          extra=MappingProxyType({"consolidated_from": list(merged)}))
        meta, stages = bset.writing(meta, name)          # an encrypted set: a new salt, sealed frames
        with bset.create_data(name, STAGING_BLOCKS) as f, \
                ThreadPoolExecutor(max(1, workers), thread_name_prefix="consolidate") as pool:
            writer = StreamWriter(cast(BinaryIO, f), meta, path=path, stages=stages)
            copy = None if stages else fmt.METHOD_CODES[meta.compression]
            for fut in _frames(plan, readers, writer.codec, pool, copy):
                writer.add(fut.result())
            totals = writer.finish()
    old = target.disks.get(chain.disk)
    extra = {k: v for k, v in (old.extra if old else {}).items() if k in ("image_info", "bus", "source")}
    extra.update({"mode": "full", "consolidated_from": list(merged)})
    log.info("%s: synthetic full %s: %d data bytes, %d stored", chain.disk, name, totals.data_bytes,
             totals.stored_bytes)
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
    journal.remove_unlisted(store, old_files, "its point was merged or removed")
    journal.finish(store)
    return Result(target, tuple(names), tuple(p.name for p in others), _stored(manifest.points),
                  _stored(updated.points))
