"""Decide what a run really does: level, disks, parent checkpoint, names. Pure logic.

Rules (virtnbdbackup conventions):
- ``auto``: ``full`` into a folder without points, ``inc`` otherwise.
- ``copy``/``full`` start a new set: the folder must not hold points yet.
- ``inc``/``diff`` are relative to the newest full/inc point *of the manifest*
  (the manifest, not libvirt, is the truth): an inc creates ``virtnbdbackup.N``,
  a diff creates no checkpoint and is named ``diff.<epoch>``.
- Disks that cannot carry a bitmap (raw) or are new to the chain are exported
  whole (``backupmode='full'``) in an inc/diff, so every point restores the
  complete domain. A chain of raw disks only still has ``virtnbdbackup.N``
  points (no libvirt checkpoint behind them): each inc copies every disk whole.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from virtnbd import errors
from virtnbd.backup.options import BackupOptions
from virtnbd.backupset import naming
from virtnbd.source import rbdextents
from virtnbd.virt.domainxml import Disk


@dataclass(frozen=True)
class PlannedDisk:
    disk: Disk
    mode: str                       # "full" (whole disk) | "inc" (dirty ranges since parent)
    reason: str = ""                # why a disk of an inc/diff is copied whole

    @property
    def target(self) -> str:
        return self.disk.target


@dataclass(frozen=True)
class Plan:
    level: str                      # effective level: copy | full | inc | diff
    point: str                      # point name: copy | virtnbdbackup.N | diff.<epoch>
    checkpoint: str | None          # checkpoint this run creates
    parent: str | None              # checkpoint the changes are relative to
    disks: tuple[PlannedDisk, ...]
    skipped: tuple[tuple[str, str], ...]     # (target, reason)
    bitmap_disks: tuple[str, ...]   # disks the new checkpoint tracks
    last_index: int                 # highest checkpoint index the manifest knows (-1: none)

    @property
    def incremental(self) -> str | None:
        return self.parent if self.level in ("inc", "diff") else None


def _points(manifest: Any) -> Sequence[Any]:
    return tuple(manifest.points) if manifest is not None else ()


def chain_points(manifest: Any) -> list[Any]:
    return [p for p in _points(manifest) if p.level in ("full", "inc")]


def effective_level(level: str, manifest: Any) -> str:
    if level == "auto":
        return "inc" if chain_points(manifest) else "full"
    return level


def check_folder(level: str, manifest: Any, folder: str, domain: str, uuid: str) -> None:
    if manifest is None:
        if level in ("inc", "diff"):
            raise errors.ChainError(reason=f"{folder}: no full backup in this folder: run -l full (or -l auto) first")
        return
    if manifest.domain_uuid and manifest.domain_uuid != uuid:
        raise errors.BackupSetError(path=folder, reason=f"holds the backup chain of domain {manifest.domain} "
                                                         f"({manifest.domain_uuid}), not of {domain} ({uuid})")
    points = _points(manifest)
    if level in ("copy", "full") and points:
        raise errors.BackupSetError(path=folder, reason=f"already holds a backup chain ({len(points)} point(s)); "
                                                         f"use a new folder for -l {level}, or -l inc/auto")
    if level in ("inc", "diff") and not chain_points(manifest):
        raise errors.ChainError(reason=f"{folder}: no full backup in this folder: run -l full (or -l auto) first")


def select_disks(disks: Sequence[Disk], include: Sequence[str], exclude: Sequence[str]
                 ) -> tuple[list[Disk], list[tuple[str, str]]]:
    targets = {d.target for d in disks}
    unknown = [t for t in (*include, *exclude) if t not in targets]
    if unknown:
        raise errors.UsageError(reason=f"no disk {', '.join(unknown)} in the domain "
                                       f"(disks: {', '.join(sorted(targets)) or 'none'})")
    chosen, skipped = [], []
    for disk in disks:
        if include and disk.target not in include:
            skipped.append((disk.target, "not in --include"))
        elif disk.target in exclude:
            skipped.append((disk.target, "in --exclude"))
        else:
            chosen.append(disk)
    if not chosen:
        raise errors.UsageError(reason="no disk left to back up")
    return chosen, skipped


def _next_index(manifest: Any) -> int:
    indexes = [naming.checkpoint_number(p.checkpoint or "") for p in _points(manifest)]
    known = [i for i in indexes if i is not None]
    return max(known) if known else -1


def _diff_name(manifest: Any, epoch: int) -> str:
    names = {p.name for p in _points(manifest)}
    while naming.diff_point_name(epoch) in names:
        epoch += 1
    return naming.diff_point_name(epoch)


def make_plan(options: BackupOptions, manifest: Any, disks: Sequence[Disk], epoch: int, *,
              folder: str = "", domain: str = "", uuid: str = "") -> Plan:
    level = effective_level(options.level, manifest)
    check_folder(level, manifest, folder or options.output, domain or options.domain, uuid)
    chosen, skipped = select_disks(disks, options.include, options.exclude)
    last = _next_index(manifest)
    if level in ("copy", "full"):
        checkpoint = naming.checkpoint_name(0) if level == "full" else None
        planned = tuple(PlannedDisk(d, "full") for d in chosen)
        # A full is always point ``virtnbdbackup.0`` and starts a chain, even when no disk can carry a
        # bitmap (all raw): libvirt then gets no checkpoint (the point says libvirt_checkpoint: false) and
        # every inc copies those disks whole; raw RBD disks keep it as an RBD snapshot (rbdextents).
        bitmaps = tuple(d.target for d in chosen if d.can_checkpoint) if checkpoint else ()
        point = checkpoint or level
        return Plan(level, point, checkpoint, None, planned, tuple(skipped), bitmaps, last)
    parent_point = chain_points(manifest)[-1]
    parent = parent_point.checkpoint
    if parent is None:      # a full of raw disks only, written before it started a chain
        raise errors.ChainError(reason=f"{folder or options.output}: point {parent_point.name} starts no chain "
                                       f"(no checkpoint); run -l full into a new folder")
    in_parent = set(parent_point.disks)
    planned_disks = []
    for disk in chosen:
        if not disk.can_checkpoint and rbdextents.tracked(disk) and disk.target in in_parent:
            planned_disks.append(PlannedDisk(disk, rbdextents.MODE))  # changes from RBD snapshot diff
        elif not disk.can_checkpoint:
            planned_disks.append(PlannedDisk(disk, "full", f"{disk.format} disks have no dirty bitmap"))
        elif disk.target not in in_parent:
            planned_disks.append(PlannedDisk(disk, "full", "disk is new to the chain"))
        else:
            planned_disks.append(PlannedDisk(disk, "inc"))
    if level == "inc":
        checkpoint = naming.checkpoint_name(last + 1)
        bitmaps = tuple(d.target for d in chosen if d.can_checkpoint)
        return Plan("inc", checkpoint, checkpoint, parent, tuple(planned_disks), tuple(skipped), bitmaps, last)
    return Plan("diff", _diff_name(manifest, epoch), None, parent, tuple(planned_disks), tuple(skipped), (), last)
