"""Where the chains of a backup root are, and which files each point owns.

A root is the ``-o`` folder of a nightly job: it holds the current chain (its
manifest) and the chains ``virtnbd.backup.archive`` moved aside into
``chain-<stamp>/`` sub-folders. ``-i`` may also name one chain folder; when
that folder is an archived chain inside a root, the root's lock still guards it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from virtnbd import errors
from virtnbd.backupset import manifest as bsmanifest
from virtnbd.backupset import naming
from virtnbd.backupset.manifest import Manifest, Point
from virtnbd.backupset.store import Store, open_store, scheme_of

PREFIX = naming.ARCHIVE_PREFIX
REMOVING = naming.REMOVING
MANIFEST = naming.MANIFEST


@dataclass(frozen=True)
class Chain:
    folder: str                # its location (a folder or s3://BUCKET/PREFIX/chain-...), for messages and opening
    label: str                 # "current" or the archive folder name
    manifest: Manifest
    archived: bool
    store: Store


@dataclass(frozen=True)
class Root:
    path: str                  # the location whose lock guards every chain below
    chains: tuple[Chain, ...]  # oldest archive first, the current chain last
    store: Store


def is_url(location: str) -> bool:
    return scheme_of(location) is not None


def load_manifest(store: Store) -> Manifest | None:
    """A chain's manifest as stored (not authenticated: enough to know which files it lists)."""
    data = store.read_bytes(MANIFEST)
    return None if data is None else bsmanifest.from_json(data, store.describe(MANIFEST))


def _is_root(store: Store) -> bool:
    return store.size(MANIFEST) is not None or any(store.size(lock) is not None for lock in naming.LOCKS) \
        or bool(archived(store))


def archived(store: Store) -> list[str]:
    """The archived chain folders of a root, oldest first (their names carry the time)."""
    return [n for n in store.folders() if n.startswith(PREFIX) and not n.endswith(REMOVING)]


def _chain(store: Store, label: str, is_archive: bool) -> Chain | None:
    found = load_manifest(store)
    return Chain(store.location, label, found, is_archive, store) if found is not None else None


def locate(path: str) -> Root:
    """The root and chains ``path`` names (a root, or one chain folder)."""
    store = open_store(path)
    if not store.exists():
        raise errors.BackupSetError(path=path, reason="no such backup folder")
    parent_path, name = os.path.split(path.rstrip("/"))
    if name.startswith(PREFIX):
        parent_path = parent_path or "."
        parent = open_store(parent_path)
        if _is_root(parent):
            one = _chain(store, name, True)
            return Root(parent_path, (one,) if one else (), parent)
    if not _is_root(store):
        raise errors.BackupSetError(path=path, reason="not a backup folder (no manifest, no chain-* folders)")
    chains = [_chain(store.sub(n), n, True) for n in archived(store)]
    chains.append(_chain(store, "current", False))
    return Root(path, tuple(c for c in chains if c is not None), store)


def _side_name(value: object) -> str | None:
    if isinstance(value, str) and value and not value.lstrip().startswith("<"):
        return os.path.normpath(value)
    return None


def point_files(point: Point) -> set[str]:
    """Every file (relative name) the point lists: streams and side files (XML, image info, boot files)."""
    names = {d.file for d in point.disks.values()}
    names.update(n for n in (_side_name(point.domain_xml), _side_name(point.checkpoint_xml)) if n)
    for key in ("qemu_img_info", "boot_files"):
        table = point.extra.get(key) or {}
        if isinstance(table, dict):
            names.update(n for n in map(_side_name, table.values()) if n)
    for disk in point.disks.values():
        name = _side_name(disk.extra.get("image_info"))
        if name:
            names.add(name)
    return {n for n in names if not n.startswith("..") and not os.path.isabs(n)}


def listed_files(manifest: Manifest) -> set[str]:
    found: set[str] = set()
    for point in manifest.points:
        found |= point_files(point)
    return found
