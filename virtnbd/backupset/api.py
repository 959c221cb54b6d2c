"""One interface for "a backup set": its points and disks, their data, adding a point, its lock and store.

A set is a *kind* (how points and disk data are laid out: our stream set,
the virtnbdbackup folder, next a qcow2 chain) on a *store* (where the bytes
live: a local folder, next object storage; ``store.py``). Backup, restore,
verify and dump reach a set's files only through :class:`BackupSet`::

    bset = open_set(location)                  # kind detected by the registered probes
    bset = create_set(location, "stream")      # for a backup: the store is prepared, kind fixed
    m = bset.manifest()                        # Manifest | None (points, disks, parent links)
    points = bset.chain(until)                 # root first, every file checked present with its size
    with bset.open_data(entry) as reader: ...  # one disk at one point: StreamReader interface
                                               # (frames, read, read_range, frames_in, iter_frames, verify)
    with bset.lock(): ...                      # exclusive, refuses a concurrent run
    with bset.create_data(name) as f: ...      # partial until clean exit, then published
    bset.commit(point, domain, uuid)           # the point becomes real, atomically
"""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager as ContextManager
from typing import Any, BinaryIO, Protocol

from virtnbd import errors
from virtnbd.backupset import chain as chain_mod
from virtnbd.backupset import legacy as legacy_set
from virtnbd.backupset import manifest as manifest_mod
from virtnbd.backupset import naming
from virtnbd.backupset.manifest import DiskEntry, Manifest, Point
from virtnbd.backupset.store import LocalStore, Store, open_store
from virtnbd.stream.codec import Stage
from virtnbd.stream.detect import open_stream
from virtnbd.stream.format import StreamMeta
from virtnbd.stream.legacy import open_raw_image
from virtnbd.stream.reader import StreamReader


class BackupSet(Protocol):
    kind: str                   # "stream" | "virtnbdbackup" | (next) "qcow2"
    store: Store
    location: str               # for messages
    stages: tuple[Stage, ...]   # codec stages beyond checksum/compression (encryption) for its streams

    def manifest(self) -> Manifest | None: ...
    def chain(self, until: str | None) -> list[Point]: ...
    def open_data(self, entry: DiskEntry) -> StreamReader: ...
    def data_name(self, disk: str, level: str, point: str) -> str: ...
    def create_data(self, name: str, staging_blocks: int = 0) -> ContextManager[BinaryIO]: ...
    def commit(self, point: Point, domain: str, domain_uuid: str) -> Manifest: ...
    def lock(self) -> ContextManager[None]: ...
    def read_side(self, name: str) -> bytes | None: ...
    def writing(self, meta: StreamMeta, name: str) -> tuple[StreamMeta, tuple[Stage, ...]]: ...
    def seal_side(self, name: str, data: bytes) -> bytes: ...
    def point_extra(self, extra: Mapping[str, Any]) -> dict[str, Any]: ...


class StreamSet:
    """Our own set: one virtnbd stream per disk and point, and ``virtnbd.manifest.json``."""

    kind = "stream"

    def __init__(self, store: Store, stages: tuple[Stage, ...] = ()) -> None:
        self.store = store
        self.location = store.location
        self.stages = stages

    def manifest(self) -> Manifest | None:
        data = self.store.read_bytes(naming.MANIFEST)
        if data is None:
            return None
        return manifest_mod.from_json(data, self.store.describe(naming.MANIFEST), self._folder())

    def _folder(self) -> str | None:
        """The folder a local manifest records (chain.resolve checks its files there)."""
        return self.store.location if isinstance(self.store, LocalStore) else None

    def chain(self, until: str | None) -> list[Point]:
        found = self.manifest()
        if found is None:
            raise errors.BackupSetError(path=self.location, reason="not a backup folder (no manifest)")
        return chain_mod.resolve(found, until)

    def open_data(self, entry: DiskEntry) -> StreamReader:
        return self.open_file(entry.file)

    def open_file(self, name: str) -> StreamReader:
        """A stream of this set by object name (FormatError naming it when it cannot be opened)."""
        path = self.store.describe(name)
        try:
            f = self.store.open_read(name)
        except OSError as err:
            raise errors.FormatError(path=path, offset=0, reason=err.strerror or str(err)) from err
        return open_stream(f, path, stages=self.stages, owns=True)

    def data_name(self, disk: str, level: str, point: str) -> str:
        return naming.data_file(disk, level, point)

    def create_data(self, name: str, staging_blocks: int = 0) -> ContextManager[BinaryIO]:
        """A new data object, published when the block exits cleanly (see Store.create)."""
        return self.store.create(name, staging_blocks)

    def commit(self, point: Point, domain: str, domain_uuid: str) -> Manifest:
        return self._commit(point, domain, domain_uuid, None)

    def _commit(self, point: Point, domain: str, domain_uuid: str, mac_key: bytes | None) -> Manifest:
        """Append ``point``: the manifest replaced whole (a folder: fsync + rename; S3: one PUT)."""
        if isinstance(self.store, LocalStore):
            return manifest_mod.commit_point(self.store.root, point, domain, domain_uuid, mac_key)
        updated = manifest_mod.append_point(self.manifest(), point, domain, domain_uuid, where=self.location,
                                            size_of=self.store.size)
        self.store.replace(naming.MANIFEST, manifest_mod.to_json(updated, mac_key))   # one atomic PUT: the commit
        return updated

    def lock(self) -> ContextManager[None]:
        return self.store.lock()

    def read_side(self, name: str) -> bytes | None:
        return self.store.read_bytes(name)

    def writing(self, meta: StreamMeta, name: str) -> tuple[StreamMeta, tuple[Stage, ...]]:
        """The metadata and codec stages a new stream ``name`` is written with."""
        return meta, self.stages

    def seal_side(self, name: str, data: bytes) -> bytes:
        """The bytes a side file is stored as (the plain set stores them as they are)."""
        return data

    def point_extra(self, extra: Mapping[str, Any]) -> dict[str, Any]:
        """A new point's ``extra`` as this set stores it."""
        return dict(extra)


class LegacySet(StreamSet):
    """A folder written by abbbi/virtnbdbackup (read only; docs/LEGACY_FORMAT.md)."""

    kind = "virtnbdbackup"

    def manifest(self) -> Manifest | None:
        return legacy_set.load(self.location)

    def chain(self, until: str | None) -> list[Point]:
        found = self.manifest()
        if found is None:
            raise errors.BackupSetError(path=self.location, reason="not a virtnbdbackup folder")
        return chain_mod.resolve(found, until)

    def open_data(self, entry: DiskEntry) -> StreamReader:
        """A stream, or the plain image virtnbdbackup saves for a raw disk (``extra["raw_image"]``)."""
        if (entry.extra or {}).get("raw_image"):
            return open_raw_image(self.store.describe(entry.file))
        return super().open_data(entry)

    def commit(self, point: Point, domain: str, domain_uuid: str) -> Manifest:
        raise errors.BackupSetError(path=self.location, reason="virtnbdbackup sets are read only")


# -- kinds: detection and creation ---------------------------------------------------

Probe = Callable[[Store], "BackupSet | None"]
_KINDS: dict[str, tuple[Probe, Callable[[Store], BackupSet]]] = {}


def register_kind(kind: str, probe: Probe, create: Callable[[Store], BackupSet], first: bool = False) -> None:
    """A kind of set: ``probe(store)`` returns the set when the store holds one of this kind.

    Probes run in registration order (``first``: ahead of all others, for a kind that refines
    another, e.g. encrypted stream sets); the first that answers wins.
    """
    others = {k: v for k, v in _KINDS.items() if k != kind}
    _KINDS.clear()
    if first:
        _KINDS[kind] = (probe, create)
    _KINDS.update(others)
    if not first:
        _KINDS[kind] = (probe, create)


def _probe_stream(store: Store) -> BackupSet | None:
    return StreamSet(store) if store.size(naming.MANIFEST) is not None else None


def _probe_legacy(store: Store) -> BackupSet | None:
    bset = LegacySet(store)
    return bset if isinstance(store, LocalStore) and bset.manifest() is not None else None


register_kind("stream", _probe_stream, StreamSet)
register_kind("virtnbdbackup", _probe_legacy, LegacySet)


def detect(store: Store) -> BackupSet | None:
    for probe, _ in _KINDS.values():
        found = probe(store)
        if found is not None:
            return found
    return None


def open_set(location: str | os.PathLike[str]) -> BackupSet:
    """The set at ``location`` (an existing set of any registered kind)."""
    store = open_store(location)
    if not store.exists():
        raise errors.BackupSetError(path=store.location, reason="no such backup folder")
    found = detect(store)
    if found is None:
        raise errors.BackupSetError(path=store.location,
                                    reason="not a backup folder (no manifest, no virtnbdbackup files)")
    return found


def create_set(location: str | os.PathLike[str], kind: str = "stream") -> BackupSet:
    """The set a backup writes into, of ``kind``: the store is prepared (created 0700, writable)."""
    entry = _KINDS.get(kind)
    if entry is None:
        raise errors.UsageError(reason=f"unknown kind of backup set {kind!r} (known: {', '.join(_KINDS)})")
    store = open_store(location)
    store.prepare()
    found = detect(store)
    if found is not None and (found.kind == "qcow2") != (kind == "qcow2"):
        raise errors.UsageError(reason=f"{store.location} holds a {found.kind} set: write -t {found.kind} points "
                                       f"into it, or a -t {kind} set into another folder")
    return entry[1](store)


class DiskView:
    """One disk as it was at a point: random reads over its chain of streams, newest layer wins.

    For map/mount-style readers: no restore, no plan of the whole disk; each
    ``read_range`` looks up only the frames it needs (``frames_in``, binary search).
    """

    def __init__(self, readers: list[StreamReader], virtual_size: int) -> None:
        self.readers = readers            # root first
        self.virtual_size = virtual_size

    def __enter__(self) -> DiskView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for reader in self.readers:
            reader.close()

    def read_range(self, offset: int, length: int) -> bytes:
        """Bytes ``offset .. offset+length`` of the disk at the point (checksum-verified)."""
        if offset < 0 or length < 0 or offset + length > self.virtual_size:
            raise errors.UsageError(reason=f"range {offset}+{length} outside the disk (0..{self.virtual_size})")
        out = bytearray(length)
        todo = [(offset, offset + length)]
        for reader in reversed(self.readers):
            todo = [gap for lo, hi in todo for gap in _fill(reader, out, offset, lo, hi)]
            if not todo:
                break
        return bytes(out)


def _fill(reader: StreamReader, out: bytearray, base: int, lo: int, hi: int) -> list[tuple[int, int]]:
    """Copy what ``reader`` holds of ``lo..hi`` into ``out`` (at ``base``); the gaps it leaves."""
    gaps, cur = [], lo
    for ref in reader.frames_in(lo, hi - lo):
        start, end = max(lo, ref.offset), min(hi, ref.offset + ref.length)
        if start > cur:
            gaps.append((cur, start))
        if ref.kind == "data":
            out[start - base:end - base] = memoryview(reader.read(ref))[start - ref.offset:end - ref.offset]
        cur = end
    if cur < hi:
        gaps.append((cur, hi))
    return gaps


def open_disk(bset: BackupSet, until: str | None, disk: str) -> DiskView:
    """``disk`` at point ``until`` (None: the newest) of any kind of set."""
    points = bset.chain(until)
    layers = chain_mod.disk_layers(points, disk)
    if not layers:
        raise errors.UsageError(reason=f"disk {disk!r} not in point {points[-1].name}")
    readers: list[StreamReader] = []
    try:
        for _point, entry in layers:
            readers.append(bset.open_data(entry))
    except BaseException:
        for reader in readers:
            reader.close()
        raise
    return DiskView(readers, layers[-1][1].virtual_size)
