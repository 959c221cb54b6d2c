"""Resolve the chain of points a restore needs, by parent links in the manifest."""
from __future__ import annotations

import os
from pathlib import Path

from virtnbd import errors
from virtnbd.backupset.manifest import DiskEntry, Manifest, Point

_ROOT_LEVELS = ("full", "copy")
_PARENT_LEVELS = {"inc": ("full", "inc"), "diff": ("full", "inc")}


def available(manifest: Manifest) -> str:
    return ", ".join(p.name for p in manifest.points) or "(none)"


def find_point(manifest: Manifest, until: str | None) -> Point:
    """The point ``until`` names (point or checkpoint name); the newest point for None."""
    if not manifest.points:
        raise errors.ChainError(reason="the backup set holds no points")
    if until is None:
        return manifest.points[-1]
    for p in manifest.points:
        if until in (p.name, p.checkpoint):
            return p
    raise errors.ChainError(reason=f"no point {until!r} in the backup set; available: {available(manifest)}")


def resolve(manifest: Manifest, until: str | None, folder: str | os.PathLike[str] | None = None) -> list[Point]:
    """Points to apply in order (root first) to restore ``until``.

    inc: back through its parents to the full; diff: its parent's chain, then
    the diff; copy: alone. When a folder is known (argument, or the one the
    manifest was loaded from) every file of every point must exist with the
    size the manifest records.
    """
    by_name = {p.name: p for p in manifest.points}
    point = find_point(manifest, until)
    chain = [point]
    while point.parent is not None:
        parent = by_name.get(point.parent)
        if parent is None:
            raise errors.ChainError(reason=f"point {point.name}: parent {point.parent} is not in the backup set; "
                                           f"available: {available(manifest)}")
        if parent.level not in _PARENT_LEVELS.get(point.level, ()):
            raise errors.ChainError(reason=f"point {point.name} ({point.level}) cannot have parent "
                                           f"{parent.name} ({parent.level})")
        if parent in chain:
            raise errors.ChainError(reason=f"point {point.name}: parent links form a cycle")
        chain.append(parent)
        point = parent
    if point.level not in _ROOT_LEVELS:
        raise errors.ChainError(reason=f"point {point.name} ({point.level}) has no parent: chain has no full backup")
    chain.reverse()
    base = folder if folder is not None else manifest.folder
    if base is not None:
        check_files(Path(base), chain)
    return chain


def check_files(folder: Path, chain: list[Point]) -> None:
    """Every file of every point exists and has the recorded size."""
    for point in chain:
        for disk in point.disks.values():
            path = folder / disk.file
            try:
                size = path.stat().st_size
            except FileNotFoundError as err:
                raise errors.ChainError(reason=f"point {point.name}: file {path} is missing") from err
            except OSError as err:
                raise errors.ChainError(reason=f"point {point.name}: file {path}: {err.strerror}") from err
            if size != disk.stored_bytes:
                raise errors.FormatError(path=str(path), offset=min(size, disk.stored_bytes),
                                         reason=f"point {point.name}: file has {size} bytes, "
                                                f"the manifest records {disk.stored_bytes}")


def disk_layers(points: list[Point], disk: str) -> list[tuple[Point, DiskEntry]]:
    """The streams of ``disk`` to apply (root first) for the last of ``points`` (a resolved chain).

    A full point, or a disk read whole inside an inc/diff (new, resized), starts afresh.
    """
    layers: list[tuple[Point, DiskEntry]] = []
    for point in points:
        entry = point.disks.get(disk)
        if entry is None:
            if layers:
                raise errors.ChainError(reason=f"point {point.name} has no stream for disk {disk} "
                                               f"although an earlier point has")
            continue
        level = entry.level or point.level
        if level in ("copy", "full") or (entry.extra or {}).get("mode") == "full":
            layers = []
        elif not layers:
            raise errors.ChainError(reason=f"disk {disk}: chain starts with {level} point {point.name}, "
                                           "no full backup before it")
        layers.append((point, entry))
    return layers
