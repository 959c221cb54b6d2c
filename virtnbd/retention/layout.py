"""Where the chains of a backup root are, and which files each point owns.

A root is the ``-o`` folder of a nightly job: it holds the current chain (its
manifest) and the chains ``virtnbd.backup.archive`` moved aside into
``chain-<stamp>/`` sub-folders. ``-i`` may also name one chain folder; when
that folder is an archived chain inside a root, the root's lock still guards it.
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from virtnbd import errors
from virtnbd.backup import archive, output
from virtnbd.backupset import manifest as bsmanifest
from virtnbd.backupset.manifest import Manifest, Point

REMOVING = archive.REMOVING


@dataclass(frozen=True)
class Chain:
    folder: Path
    label: str                 # "current" or the archive folder name
    manifest: Manifest
    archived: bool


@dataclass(frozen=True)
class Root:
    path: Path                 # the folder whose lock guards every chain below
    chains: tuple[Chain, ...]  # oldest archive first, the current chain last


def _is_root(path: Path) -> bool:
    return (path / bsmanifest.naming.MANIFEST).exists() or (path / output.LOCK_FILE).exists() or any(archived(path))


def archived(path: Path) -> Iterable[Path]:
    """The archived chain folders of a root, oldest first (their names carry the time)."""
    if not path.is_dir():
        return []
    return sorted(p for p in path.iterdir() if p.is_dir() and p.name.startswith(archive.PREFIX)
                  and not p.name.endswith(REMOVING))


def _chain(folder: Path, label: str, is_archive: bool) -> Chain | None:
    found = bsmanifest.load(folder)
    return Chain(folder, label, found, is_archive) if found is not None else None


def locate(path: str) -> Root:
    """The root and chains ``path`` names (a root, or one chain folder)."""
    where = Path(path)
    if not where.is_dir():
        raise errors.BackupSetError(path=path, reason="no such backup folder")
    if where.name.startswith(archive.PREFIX) and _is_root(where.parent):
        one = _chain(where, where.name, True)
        return Root(where.parent, (one,) if one else ())
    if not _is_root(where):
        raise errors.BackupSetError(path=path, reason="not a backup folder (no manifest, no chain-* folders)")
    chains = [_chain(p, p.name, True) for p in archived(where)]
    chains.append(_chain(where, "current", False))
    return Root(where, tuple(c for c in chains if c is not None))


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
