"""Backups of a shut-off domain: its images exported read-only with ``qemu-nbd``.

The chain must look afterwards exactly as if the point had been taken online,
so the next online inc continues it:

* ``full``: our old checkpoints are forgotten (libvirt cannot delete
  checkpoints of an inactive domain: metadata only) and our old bitmaps are
  removed from the images with ``qemu-img bitmap --remove``; then the bitmap
  ``virtnbdbackup.0`` is added.
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
checkpoints a killed run left (index above the manifest's newest point) are
removed at the start of the next run. Network disks (RBD, iSCSI, ...) cannot
be exported offline: the run says so and asks for a running domain.
"""
from __future__ import annotations

import contextlib
import ctypes
import logging
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import libvirt
from lxml import etree

from virtnbd import errors
from virtnbd.backup import output
from virtnbd.backup import run as backup_run
from virtnbd.backup.options import BackupOptions
from virtnbd.backup.plan import Plan, PlannedDisk
from virtnbd.backupset.api import BackupSet
from virtnbd.extents import BASE_ALLOCATION, DATA, iter_extents
from virtnbd.nbdsource import NbdSource
from virtnbd.virt import bitmaps, checkpoints, connection

log = logging.getLogger(__name__)

QEMU_NBD = "qemu-nbd"
START_TIMEOUT = 30.0
CONSISTENCY = "offline"
PR_SET_PDEATHSIG = 1


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

def _nbd_cmd(pd: PlannedDisk, socket: Path, bitmap: str | None) -> list[str]:
    cmd = [QEMU_NBD, "--read-only", "--persistent", "--shared=16", f"--format={pd.disk.format}",
           f"--export-name={pd.target}", f"--socket={socket}", "--cache=none", "--aio=threads"]
    if bitmap:
        cmd.append(f"--bitmap={bitmap}")
    return [*cmd, str(pd.disk.path)]


def _die_with_parent() -> None:
    """In the child: SIGTERM when the backup process dies (a killed run leaves no export holding the image)."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _wait_socket(proc: subprocess.Popen[bytes], socket: Path, target: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while not socket.exists():
        if proc.poll() is not None:
            err = (proc.stderr.read() if proc.stderr else b"").decode(errors="replace").strip()
            last = err.splitlines()[-1] if err else f"exit {proc.returncode}"
            raise errors.NbdError(export=target, reason=f"qemu-nbd ended: {last}")
        if time.monotonic() > deadline:
            raise errors.NbdError(export=target, reason=f"qemu-nbd did not create {socket} in {START_TIMEOUT:.0f}s")
        time.sleep(0.01)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stderr:
        proc.stderr.close()


@contextlib.contextmanager
def exports(plan: Plan, workdir: Path) -> Iterator[dict[str, str]]:
    """One read-only qemu-nbd per disk (export name = target); all stopped at exit."""
    if shutil.which(QEMU_NBD) is None:
        raise errors.UsageError(reason="offline backup needs qemu-nbd (package qemu-utils)")
    procs: list[subprocess.Popen[bytes]] = []
    sockets: dict[str, str] = {}
    try:
        for pd in plan.disks:
            socket = workdir / f"{pd.target}.nbd.sock"
            bitmap = plan.parent if pd.mode == "inc" else None
            proc = subprocess.Popen(_nbd_cmd(pd, socket, bitmap), stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    preexec_fn=_die_with_parent)  # noqa: PLW1509 (one call, no locks taken)
            procs.append(proc)
            _wait_socket(proc, socket, pd.target)
            sockets[pd.target] = str(socket)
        yield sockets
    finally:
        for proc in procs:
            _stop(proc)


class OfflineRun(backup_run.BackupRun):
    """A backup run whose disks come from per-disk qemu-nbd exports."""

    sockets: dict[str, str]

    def bitmap_for(self, pd: PlannedDisk) -> str | None:
        return _context(self.plan.parent) if pd.mode == "inc" and self.plan.parent else None

    def copy_one(self, pd: PlannedDisk, socket: str, pool: ThreadPoolExecutor) -> backup_run.DiskResult:
        return super().copy_one(pd, self.sockets[pd.target], pool)


# -- bitmaps and checkpoint metadata --------------------------------------------

def _ours_above(names: Sequence[str], index: int) -> list[str]:
    return [n for n in names if (checkpoints.index_of(n) if checkpoints.is_ours(n) else -1) > index]  # type: ignore[operator]


def clean_leftovers(dom: libvirt.virDomain, plan: Plan) -> None:
    """Forget checkpoints and remove bitmaps of ours that no committed point owns."""
    above = -1 if plan.level == "full" else plan.last_index
    if plan.level == "copy":
        return
    for name in reversed(_ours_above(checkpoints.list_ours(dom), above)):
        checkpoints.delete_metadata(dom, name)
        log.info("forgot checkpoint %s (%s)", name, "new chain" if plan.level == "full" else "left by a failed run")
    for pd in plan.disks:
        if not pd.disk.can_checkpoint or not pd.disk.path:
            continue
        for name in _ours_above(sorted(bitmaps.list_bitmaps(pd.disk.path)), above):
            bitmaps.remove(pd.disk.path, name)
            log.info("%s: removed bitmap %s from %s", pd.target, name, pd.disk.path)


def add_bitmaps(plan: Plan, added: list[tuple[str, str]]) -> None:
    if not plan.checkpoint:
        return
    for pd in plan.disks:
        if pd.target in plan.bitmap_disks and pd.disk.path:
            bitmaps.add(pd.disk.path, plan.checkpoint)
            added.append((pd.disk.path, plan.checkpoint))


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
    with output.work_dir(options.scratchdir) as workdir, exports(plan, workdir) as sockets:
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
        with output.work_dir(options.scratchdir) as workdir:
            add_bitmaps(plan, added)
            with exports(plan, workdir) as run_.sockets:
                results = run_.copy_all("")
            saved_cp = define_checkpoint(dom, plan, all_targets, connection.domain_xml(dom, inactive=True))
            defined = saved_cp is not None
            saved = run_.save_side_files(side, saved_cp)
            point = run_.point(results, saved, CONSISTENCY, {"offline": True, "libvirt_checkpoint": defined})
            updated = bset.commit(point, dom.name(), uuid)
    except BaseException:
        side.discard()
        _undo(dom, plan, added, defined)
        raise
    return backup_run.report(summary, plan, updated, results)


