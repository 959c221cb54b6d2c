"""Preflight of an inc/diff: can the chain in the folder really be continued?

Checked before anything is written, in this order:

1. Checkpoint metadata of the chain's points that libvirt lost (transient
   domain, domain undefined and defined again, moved to another host) is
   redefined from the checkpoint XML saved in the backup folder.
2. The parent checkpoint's bitmap is present and usable on every disk the run
   reads through a bitmap: ``qemu-img info`` of the image while the domain is
   shut off, the checkpoint's size query (``VIR_DOMAIN_CHECKPOINT_XML_SIZE``)
   while it runs.
3. A disk whose size differs from the parent point is read whole in this point
   (a bitmap says nothing about a size change; restore then takes the new size).

A problem in 1 or 2 is a broken chain: with ``-l auto`` or ``--fallback-full``
the old chain is moved to ``FOLDER/chain-<stamp>/`` and a new chain starts with
a full backup (one WARNING line says so); otherwise the run fails with the cause
and the command that fixes it. Checkpoints that are not ours are never touched.
"""
from __future__ import annotations

import dataclasses
import datetime
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import libvirt

from virtnbd import errors
from virtnbd.backup import archive, output, renew
from virtnbd.backup.options import BackupOptions
from virtnbd.backup.plan import Plan, PlannedDisk, chain_points
from virtnbd.backupset.api import BackupSet
from virtnbd.virt import bitmaps, checkpoints, xmlbuild

log = logging.getLogger(__name__)

Replan = Callable[[BackupOptions, Any], Plan]


@dataclass(frozen=True)
class Problem:
    cause: str


@dataclass(frozen=True)
class Verdict:
    plan: Plan
    manifest: Any
    note: str = ""                  # one line for the user when the chain was restarted


def _saved_xml(bset: BackupSet, point: Any) -> str | None:
    if not point.checkpoint_xml:
        return None
    try:
        data = bset.read_side(point.checkpoint_xml)
        return None if data is None else data.decode("utf-8")
    except (errors.VirtnbdError, OSError, UnicodeDecodeError):
        return None


def redefine_lost(dom: libvirt.virDomain, manifest: Any, bset: BackupSet) -> tuple[list[str], list[Problem]]:
    """Redefine our checkpoints of the folder's chain that libvirt no longer knows, oldest first."""
    known = set(checkpoints.list_names(dom))
    redefined: list[str] = []
    problems: list[Problem] = []
    for point in chain_points(manifest):
        name = point.checkpoint
        if not name or name in known:
            continue
        if (point.extra or {}).get("libvirt_checkpoint") is False:
            continue  # only RBD snapshots track this point (raw RBD disks, virtnbd/rbdextents.py)
        xml = _saved_xml(bset, point)
        if xml is None:
            problems.append(Problem(f"checkpoint {name} is missing in libvirt and the backup folder has no "
                                    f"saved XML to redefine it"))
            continue
        try:
            checkpoints.redefine(dom, xml)
        except errors.CheckpointError as err:
            problems.append(Problem(f"checkpoint {name} is missing in libvirt and redefining it from "
                                    f"{point.checkpoint_xml} failed: {err.reason}"))
            continue
        redefined.append(name)
    if redefined:
        log.warning("libvirt had lost checkpoint metadata of domain %s: redefined %s from the backup folder",
                    dom.name(), ", ".join(redefined))
    return redefined, problems


def _bitmap_problem_offline(pd: PlannedDisk, parent: str) -> Problem | None:
    path = pd.disk.path
    if not path:
        return Problem(f"disk {pd.target}: no image path to check bitmap {parent}")
    try:
        found = bitmaps.list_bitmaps(path)
    except errors.LibvirtError as err:
        return Problem(f"disk {pd.target}: {err.reason}")
    bitmap = found.get(parent)
    if bitmap is None:
        return Problem(f"disk {pd.target}: bitmap {parent} is missing in {path}")
    if bitmap.broken:
        return Problem(f"disk {pd.target}: bitmap {parent} in {path} is inconsistent "
                       f"(flags {', '.join(bitmap.flags)}: QEMU stopped without saving it)")
    return None


def _bitmap_problems_online(dom: libvirt.virDomain, plan: Plan, disks: Sequence[PlannedDisk]) -> list[Problem]:
    parent = plan.parent or ""
    try:
        xml = checkpoints.get_xml(dom, parent, with_size=True)
    except errors.CheckpointError as err:
        return [Problem(f"checkpoint {parent}: {err.reason}")]
    sizes = xmlbuild.checkpoint_sizes(xml)
    return [Problem(f"disk {pd.target}: bitmap {parent} is missing or broken in the running domain")
            for pd in disks if pd.target not in sizes]


def bitmap_problems(dom: libvirt.virDomain, plan: Plan, running: bool) -> list[Problem]:
    disks = [pd for pd in plan.disks if pd.mode == "inc"]
    if not disks or not plan.parent:
        return []
    if running:
        return _bitmap_problems_online(dom, plan, disks)
    found = [_bitmap_problem_offline(pd, plan.parent) for pd in disks]
    return [p for p in found if p is not None]


def disk_size(dom: libvirt.virDomain, pd: PlannedDisk) -> int | None:
    try:
        capacity, _allocation, _physical = dom.blockInfo(pd.target)
    except libvirt.libvirtError:
        return None
    return int(capacity)


def whole_if_resized(plan: Plan, parent_point: Any, sizes: Mapping[str, int | None]) -> Plan:
    """Disks whose size changed since the parent point are read whole in this point."""
    changed = []
    for pd in plan.disks:
        entry = parent_point.disks.get(pd.target)
        size = sizes.get(pd.target)
        if pd.mode == "inc" and entry is not None and size is not None and size != entry.virtual_size:
            changed.append(dataclasses.replace(
                pd, mode="full", reason=f"disk size changed from {entry.virtual_size} to {size} bytes"))
        else:
            changed.append(pd)
    return dataclasses.replace(plan, disks=tuple(changed))


def _orphan_xml(name: str, target: str) -> str:
    return (f"<domaincheckpoint><name>{name}</name><creationTime>{int(time.time())}</creationTime>"
            f"<disks><disk name='{target}' checkpoint='bitmap' bitmap='{name}'/></disks></domaincheckpoint>")


def drop_orphan_bitmaps(dom: libvirt.virDomain, plan: Plan) -> list[str]:
    """Bitmaps of ours that no checkpoint owns in a RUNNING domain (a killed offline run added them).

    QEMU loaded them from the image; creating the checkpoint of that name would
    fail ("bitmap already exists"). libvirt removes a bitmap only through a
    checkpoint: define one for it (REDEFINE), then delete it. A fresh chain
    (full) drops every such bitmap, an inc/diff those above the newest point.
    Shut-off domains: :func:`virtnbd.backup.offline.clean_leftovers`.
    """
    above = -1 if plan.level == "full" else plan.last_index
    known = set(checkpoints.list_names(dom))
    dropped = []
    for pd in plan.disks:
        if not pd.disk.can_checkpoint or not pd.disk.path or pd.disk.source_type != "file":
            continue
        try:
            found = bitmaps.list_bitmaps(pd.disk.path)
        except errors.LibvirtError as err:
            log.debug("%s: cannot list bitmaps: %s", pd.target, err)
            continue
        for name in sorted(found):
            index = checkpoints.index_of(name) if name != checkpoints.PENDING else above + 1
            if index is None or index <= above or name in known:
                continue
            checkpoints.redefine(dom, _orphan_xml(name, pd.target))
            checkpoints.delete(dom, name)
            log.warning("%s: removed bitmap %s that no checkpoint owned (left by a killed run)", pd.target, name)
            dropped.append(name)
    return dropped


def _fix(options: BackupOptions, folder: str) -> str:
    return (f"start a new chain: virtnbdbackup -d {options.domain} -l full -o NEW_FOLDER, or rerun with "
            f"--fallback-full (moves this chain to {folder}/{archive.PREFIX}<time>/ and starts a new one here)")


def preflight(options: BackupOptions, dom: libvirt.virDomain, bset: BackupSet, manifest: Any, plan: Plan, *,
              running: bool, replan: Replan) -> Verdict:
    """Check (and repair what can be repaired) before an inc/diff; see the module doc."""
    if running and plan.level != "copy" and not options.printonly:
        drop_orphan_bitmaps(dom, plan)
    if plan.level not in ("inc", "diff") or manifest is None:
        return Verdict(plan, manifest)
    reason = renew.due(options.renew, manifest, datetime.datetime.now(datetime.UTC)) \
        if options.level == "auto" and not options.printonly else None
    if reason:
        return _new_chain(options, bset, replan, f"renew: {reason}")
    _redefined, problems = redefine_lost(dom, manifest, bset)
    if not problems:
        problems = bitmap_problems(dom, plan, running)
    if not problems:
        parent_point = chain_points(manifest)[-1]
        sizes = {pd.target: disk_size(dom, pd) for pd in plan.disks}
        return Verdict(whole_if_resized(plan, parent_point, sizes), manifest)
    cause = "; ".join(p.cause for p in problems)
    if not (options.level == "auto" or options.fallback_full) or options.printonly:
        raise errors.ChainError(reason=f"cannot continue the chain in {bset.location}: {cause}; "
                                       f"{_fix(options, bset.location)}")
    return _new_chain(options, bset, replan, f"chain broken ({cause})")


def _new_chain(options: BackupOptions, bset: BackupSet, replan: Replan, why: str) -> Verdict:
    moved = archive.archive_store(bset.store, output.stamp())
    note = f"{why}: old chain moved to {moved} (restorable with -i there), starting a new chain with a full backup"
    log.warning("%s", note)
    full = dataclasses.replace(options, level="full")
    return Verdict(replan(full, None), None, note)
