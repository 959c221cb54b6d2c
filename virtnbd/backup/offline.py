"""Backups of a shut-off domain: its images exported read-only with ``qemu-nbd``.

The chain must look afterwards exactly as if the point had been taken online,
so the next online inc continues it:

* ``full``: an enabled bitmap ``virtnbdbackup.pending`` is added and the
  images are copied; the previous chain is left untouched until the point is
  committed. Only then are our old bitmaps removed (``qemu-img bitmap
  --remove``) and old checkpoints forgotten (libvirt cannot delete checkpoints
  of an inactive domain: metadata only), the pending bitmap merged into a new
  ``virtnbdbackup.0`` and its checkpoint defined. A full that fails before its
  commit (image locked, disk full, ...) leaves the previous chain continuable.
* ``inc``: the export carries the parent's persistent bitmap
  (``qemu-nbd --bitmap=virtnbdbackup.N``) and the run reads its dirty ranges;
  a new enabled bitmap ``virtnbdbackup.N+1`` is added. The parent's bitmap is
  left as it is (libvirt keeps every checkpoint's bitmap recording), so no
  earlier point loses a change.
* ``diff``: reads through the parent's bitmap, adds nothing. ``copy``: touches
  no bitmap.
* After the copy the new checkpoint's metadata is defined in libvirt with
  ``VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE`` (parent, disks, bitmap names, domain
  XML), so the next online inc finds checkpoint and bitmap as libvirt made them.

Bitmaps are added before the export starts: ``qemu-nbd`` holds the image
(read-only) during the copy, so the domain cannot start and write in between.
A failed run removes the bitmaps and checkpoint metadata it added; bitmaps and
checkpoints a killed run left (index above the manifest's newest point, or a
pending bitmap) are removed at the start of the next run. Network disks (RBD, iSCSI, ...) cannot
be exported offline: the run says so and asks for a running domain.
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import libvirt
from lxml import etree

from virtnbd import errors
from virtnbd.backup import diskrun as backup_run
from virtnbd.backup import output
from virtnbd.backup.options import BackupOptions
from virtnbd.backup.plan import Plan, PlannedDisk
from virtnbd.backupset.api import BackupSet
from virtnbd.remote import host
from virtnbd.source.extents import BASE_ALLOCATION, DATA, iter_extents
from virtnbd.source.nbdsource import Address, NbdSource
from virtnbd.virt import bitmaps, checkpoints, connection

log = logging.getLogger(__name__)

QEMU_NBD = "qemu-nbd"
START_TIMEOUT = 30.0
CONSISTENCY = "offline"
PR_SET_PDEATHSIG = 1
PENDING = checkpoints.PENDING


def _context(name: str) -> str:
    return f"qemu:dirty-bitmap:{name}"


def check_disks(plan: Plan, domain: str) -> None:
    for pd in plan.disks:
        if pd.disk.source_type not in ("file", "block") or not pd.disk.path:
            raise errors.UsageError(reason=f"domain {domain} is shut off and disk {pd.target} is a "
                                           f"{pd.disk.source_type} disk ({pd.disk.protocol or 'no local path'}), "
                                           f"which cannot be exported offline: start the domain and run the "
                                           f"backup online")


# -- qemu-nbd exports -------------------------------------------------------------

def _specs(plan: Plan) -> list[host.ExportSpec]:
    return [host.ExportSpec(pd.target, str(pd.disk.path), pd.disk.format,
                            plan.parent if pd.mode == "inc" else None) for pd in plan.disks]


def exports(plan: Plan, workdir: str) -> contextlib.AbstractContextManager[dict[str, Address]]:
    """One read-only qemu-nbd per disk on the disks' host (export name = target); all stopped at exit."""
    return host.current().exports(_specs(plan), workdir)


class OfflineRun(backup_run.BackupRun):
    """A backup run whose disks come from per-disk qemu-nbd exports."""

    sockets: dict[str, Address]

    def bitmap_for(self, pd: PlannedDisk) -> str | None:
        return _context(self.plan.parent) if pd.mode == "inc" and self.plan.parent else None

    def copy_one(self, pd: PlannedDisk, socket: Address, pool: ThreadPoolExecutor) -> backup_run.DiskResult:
        return super().copy_one(pd, self.sockets[pd.target], pool)


# -- bitmaps and checkpoint metadata --------------------------------------------

def _ours_above(names: Sequence[str], index: int) -> list[str]:
    return [n for n in names if (checkpoints.index_of(n) if checkpoints.is_ours(n) else -1) > index]  # type: ignore[operator]


def clean_leftovers(dom: libvirt.virDomain, plan: Plan) -> None:
    """Forget checkpoints and remove bitmaps of ours that no committed point owns.

    A full touches nothing of the previous chain here (see :func:`switch_chain`);
    it only drops the pending bitmap of an earlier full that never committed.
    """
    if plan.level == "copy":
        return
    for pd in _bitmap_capable(plan):
        if PENDING in bitmaps.list_bitmaps(str(pd.disk.path)):
            bitmaps.remove(str(pd.disk.path), PENDING)
            log.info("%s: removed bitmap %s of a full that never committed", pd.target, PENDING)
    if checkpoints.exists(dom, PENDING):        # an online full that never committed
        checkpoints.delete_metadata(dom, PENDING)
        log.info("forgot checkpoint %s of a full that never committed", PENDING)
    if plan.level == "full":
        return
    _drop_ours_above(dom, plan, plan.last_index, "left by a failed run")


def _bitmap_capable(plan: Plan) -> list[PlannedDisk]:
    return [pd for pd in plan.disks if pd.disk.can_checkpoint and pd.disk.path]


def _drop_ours_above(dom: libvirt.virDomain, plan: Plan, above: int, why: str) -> None:
    """Bitmaps first: they need the image's write lock, so a locked image fails before any metadata goes."""
    for pd in _bitmap_capable(plan):
        for name in _ours_above(sorted(bitmaps.list_bitmaps(str(pd.disk.path))), above):
            bitmaps.remove(str(pd.disk.path), name)
            log.info("%s: removed bitmap %s from %s (%s)", pd.target, name, pd.disk.path, why)
    for name in reversed(_ours_above(checkpoints.list_ours(dom), above)):
        checkpoints.delete_metadata(dom, name)
        log.info("forgot checkpoint %s (%s)", name, why)


def add_bitmaps(plan: Plan, added: list[tuple[str, str]]) -> None:
    """The new point's bitmap on every tracked disk; a full's under the name PENDING until it commits."""
    if not plan.checkpoint:
        return
    name = PENDING if plan.level == "full" else plan.checkpoint
    for pd in plan.disks:
        if pd.target in plan.bitmap_disks and pd.disk.path:
            bitmaps.add(pd.disk.path, name)
            added.append((pd.disk.path, name))


def switch_chain(dom: libvirt.virDomain, plan: Plan, xml: str | None) -> None:
    """After a full committed: drop the previous chain, give the pending bitmap the checkpoint's name.

    Until here the previous chain stayed whole, so a full failing at any earlier
    step leaves it continuable. A failure here leaves the committed full without
    its checkpoint: the next inc of the new folder reports the chain broken and
    (-l auto / --fallback-full) starts a new one.
    """
    _drop_ours_above(dom, plan, -1, "new chain")
    if not plan.checkpoint or xml is None:
        return
    for pd in _bitmap_capable(plan):
        if pd.target in plan.bitmap_disks:
            bitmaps.add_merged(str(pd.disk.path), plan.checkpoint, PENDING)
            bitmaps.remove(str(pd.disk.path), PENDING)
    checkpoints.redefine(dom, xml)


def checkpoint_xml(plan: Plan, all_targets: Sequence[str], domain_xml: str, now: int) -> str:
    """The ``<domaincheckpoint>`` libvirt would have made online, for REDEFINE."""
    root = etree.Element("domaincheckpoint")
    etree.SubElement(root, "name").text = plan.checkpoint
    etree.SubElement(root, "description").text = "virtnbdbackup checkpoint (offline)"
    if plan.level == "inc" and plan.parent:
        parent = etree.SubElement(root, "parent")
        etree.SubElement(parent, "name").text = plan.parent
    etree.SubElement(root, "creationTime").text = str(now)
    disks = etree.SubElement(root, "disks")
    for target in all_targets:
        if target in plan.bitmap_disks:
            etree.SubElement(disks, "disk", name=target, checkpoint="bitmap", bitmap=str(plan.checkpoint))
        else:
            etree.SubElement(disks, "disk", name=target, checkpoint="no")
    root.append(etree.fromstring(domain_xml.encode()))
    return etree.tostring(root, pretty_print=True, encoding="unicode")


def define_checkpoint(dom: libvirt.virDomain, plan: Plan, all_targets: Sequence[str], domain_xml: str) -> str | None:
    if not plan.checkpoint or not plan.bitmap_disks:
        return None
    checkpoints.redefine(dom, checkpoint_xml(plan, all_targets, domain_xml, int(time.time())))
    return checkpoints.get_xml(dom, plan.checkpoint)


def _undo(dom: libvirt.virDomain, plan: Plan, added: list[tuple[str, str]], defined: bool) -> None:
    if defined and plan.checkpoint:
        try:
            checkpoints.delete_metadata(dom, plan.checkpoint)
        except errors.VirtnbdError as err:
            log.warning("could not forget checkpoint %s: %s (the next run does)", plan.checkpoint, err)
    for path, name in added:
        try:
            bitmaps.remove(path, name)
        except errors.VirtnbdError as err:
            log.warning("could not remove bitmap %s from %s: %s (the next run does)", name, path, err)


# -- size estimate (-p / -T) ---------------------------------------------------------

def estimate(options: BackupOptions, plan: Plan) -> dict[str, int]:
    """Bytes the run would read per disk: dirty bytes of the parent's bitmap, allocated bytes when whole.

    Online, libvirt measures a checkpoint's dirty size; for a shut-off domain it
    cannot, so the images are exported and their block status is summed.
    """
    check_disks(plan, "")
    sizes: dict[str, int] = {}
    with host.current().work_dir(options.scratchdir, "") as workdir, exports(plan, workdir) as sockets:
        for pd in plan.disks:
            bitmap = _context(plan.parent) if pd.mode == "inc" and plan.parent else None
            contexts = (BASE_ALLOCATION, bitmap) if bitmap else (BASE_ALLOCATION,)
            with NbdSource(sockets[pd.target], pd.target, contexts, connections=1, depth=1, buffers=1) as src:
                found = iter_extents(src.block_status, src.size, bitmap, export=pd.target)
                sizes[pd.target] = sum(e.length for e in found if bitmap or e.kind == DATA)
    return sizes


# -- the run -----------------------------------------------------------------------

def execute(options: BackupOptions, dom: libvirt.virDomain, bset: BackupSet, plan: Plan, *, domain_xml: str,
            uuid: str, summary: Any, all_targets: list[str]) -> Any:
    check_disks(plan, dom.name())
    for path in output.remove_stale_work_dirs(options.scratchdir):
        log.warning("removed scratch folder of a killed run: %s", path)
    clean_leftovers(dom, plan)
    run_ = OfflineRun(options, dom, bset, plan, domain_xml=domain_xml, uuid=uuid)
    side = run_.side_files()
    added: list[tuple[str, str]] = []
    defined = False
    summary.consistency = CONSISTENCY
    try:
        with host.current().work_dir(options.scratchdir, dom.name()) as workdir:
            add_bitmaps(plan, added)
            with exports(plan, workdir) as run_.sockets:
                results = run_.copy_all("")
            saved_cp, defined = _checkpoint_of(dom, plan, all_targets)
            saved = run_.save_side_files(side, saved_cp)
            point = run_.point(results, saved, CONSISTENCY, {"offline": True,
                                                             "libvirt_checkpoint": saved_cp is not None})
            updated = bset.commit(point, dom.name(), uuid)
    except BaseException:
        side.discard()
        run_.discard_images()
        _undo(dom, plan, added, defined)
        raise
    if plan.level == "full":
        switch_committed(plan, lambda: switch_chain(dom, plan, saved_cp))
    return backup_run.report(summary, plan, updated, results)


def _checkpoint_of(dom: libvirt.virDomain, plan: Plan, all_targets: list[str]) -> tuple[str | None, bool]:
    """(checkpoint XML to save, defined in libvirt now?): a full's is defined only after its commit."""
    inactive_xml = connection.domain_xml(dom, inactive=True)
    if plan.level != "full":
        saved = define_checkpoint(dom, plan, all_targets, inactive_xml)
        return saved, saved is not None
    if not plan.checkpoint or not plan.bitmap_disks:
        return None, False
    return checkpoint_xml(plan, all_targets, inactive_xml, int(time.time())), False


def switch_committed(plan: Plan, switch: Callable[[], None]) -> None:
    """Run a committed full's chain switch; a failure says the point is safe but its chain cannot go on."""
    try:
        switch()
    except errors.VirtnbdError as err:
        raise errors.ChainError(
            reason=f"full point {plan.point} is committed and restorable, but setting up its checkpoint "
                   f"failed ({err}); the next inc cannot continue it: run -l auto or --fallback-full") from err
