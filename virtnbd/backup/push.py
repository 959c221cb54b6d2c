"""``--push``: the point's qcow2 images are written by a libvirt push-mode backup job, not by our reader.

For each disk we pre-create the point's image under its partial name with the qcow2 set's own
:func:`~virtnbd.backupset.qcow2set.prepare_image` (standalone for copy/full and for disks copied
whole, an overlay with a relative backing name for inc/diff), start ``<domainbackup mode='push'>``
reusing them (:mod:`virtnbd.virt.pushjob`), wait for QEMU to finish, then
:func:`~virtnbd.backupset.qcow2set.finish_image` flushes, hashes (integrity records) and renames
each image. Only then does run.py commit the point, exactly as for a pull run.

QEMU runs as its own user (libvirt's DAC label): libvirt hands it each target file, but QEMU must
be able to reach the file's folder, so the backup folder is made searchable (``0711``, no listing)
while the job runs, and its parents must already be searchable by that user.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from lxml import etree

from virtnbd import errors
from virtnbd.backup.diskrun import BackupRun, DiskResult, size_text
from virtnbd.backup.plan import PlannedDisk
from virtnbd.backupset.qcow2set import PreparedImage, backing_image, finish_image, prepare_image
from virtnbd.virt import connection, xmlbuild
from virtnbd.virt.pushjob import PushJob

log = logging.getLogger(__name__)

OFFLINE_NOTE = ("--push needs a running QEMU: domain {domain} is shut off, so this point was written by the "
                "pull path (qemu-nbd) into the same qcow2 set")


class PushRun:
    """One point's push job: images prepared, job XML, wait, finish (``run_.discard_images`` on failure)."""

    def __init__(self, run_: BackupRun) -> None:
        self.run = run_
        self.images: list[PreparedImage] = []
        self.hash_seconds = 0.0
        self.job_seconds = 0.0

    def prepare(self, skipped: list[str]) -> str:
        """Create every disk's target image; the push job's XML."""
        check_reachable(self.run.dom, Path(self.run.bset.location))
        manifest = self.run.bset.manifest()
        for pd in self.run.plan.disks:
            self.images.append(self._prepare_one(pd, manifest))
            self.run.images.append(self.images[-1])      # removed by run_.discard_images() unless committed
        disks = [xmlbuild.PushDisk(img.disk, os.path.abspath(img.path), full=img.backing is None)
                 for img in self.images]
        plan = self.run.plan
        uses_bitmaps = any(pd.mode == "inc" for pd in plan.disks)
        return xmlbuild.push_backup_xml(disks, skipped, incremental=plan.incremental if uses_bitmaps else None)

    def _prepare_one(self, pd: PlannedDisk, manifest: Any) -> PreparedImage:
        plan = self.run.plan
        relative = plan.level in ("inc", "diff") and pd.mode == "inc"
        backing = backing_image(manifest, plan.parent, pd.target) if relative else None
        return prepare_image(self.run.bset, disk=pd.target, point=plan.point, level=plan.level,
                             virtual_size=_capacity(self.run.dom, pd.target), backing=backing,
                             checkpoint=plan.checkpoint, parent=plan.parent if plan.level in ("inc", "diff") else None,
                             disk_format=pd.disk.format)

    def targets(self) -> list[str]:
        """Absolute paths, as the job's XML names them (libvirt wants them absolute)."""
        return [os.path.abspath(img.path) for img in self.images]

    def job(self) -> PushJob:
        return PushJob(self.run.dom, self.targets())

    @contextlib.contextmanager
    def reachable(self) -> Iterator[None]:
        """The backup folder searchable by QEMU's user while the job runs (restored after)."""
        with searchable(Path(self.run.bset.location)):
            yield

    def finish(self, job: PushJob, tick: Callable[[], None] | None = None) -> list[DiskResult]:
        """Wait for QEMU, then flush, hash and rename each image (not yet committed)."""
        dom = self.run.dom
        result = job.wait(tick or (lambda: connection.check_alive(dom.connect())))
        self.job_seconds = result.seconds
        log.info("push job of %s completed: %s copied by QEMU in %.2fs", dom.name(),
                 size_text(result.bytes_processed), result.seconds)
        return [self._finish_one(img) for img in self.images]

    def _finish_one(self, img: PreparedImage) -> DiskResult:
        data, zero = image_counts(img.path)
        started = time.monotonic()
        entry = finish_image(self.run.bset, img, data_bytes=data, zero_bytes=zero,
                             extra={"writer": "push", "mode": _mode(self.run.plan, img.disk)})
        seconds = time.monotonic() - started
        self.hash_seconds += seconds
        log.info("%s: %s data, %s zero in %s; flushed and hashed in %.2fs", img.disk, size_text(data),
                 size_text(zero), entry.file, seconds)
        return DiskResult(img.disk, entry, data, seconds)



def _mode(plan: Any, disk: str) -> str:
    return next((pd.mode for pd in plan.disks if pd.target == disk), "full")


def _capacity(dom: Any, target: str) -> int:
    import libvirt
    try:
        return int(dom.blockInfo(target)[0])
    except libvirt.libvirtError as err:
        raise errors.LibvirtError(reason=f"cannot read the size of disk {target}: {connection.reason(err)}") from err


def image_counts(path: str) -> tuple[int, int]:
    """(data bytes, zero bytes) the image's own layer holds (``qemu-img map``: backing layers excluded)."""
    try:
        out = subprocess.run(["qemu-img", "map", "--output=json", "-f", "qcow2", path], check=True,
                             capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as err:
        raise errors.StorageError(path=path, reason=f"qemu-img map failed: {err}") from err
    data = zero = 0
    for ext in json.loads(out):
        if ext.get("depth", 0) != 0:
            continue
        if ext.get("data"):
            data += int(ext["length"])
        elif ext.get("zero"):
            zero += int(ext["length"])
    return data, zero


# -- QEMU's user must reach the backup folder ------------------------------------------

def qemu_ids(dom: Any) -> tuple[int, int] | None:
    """(uid, gid) QEMU runs as, from the live domain's DAC label; None when it is not told."""
    root = etree.fromstring(connection.domain_xml(dom).encode())
    for label in root.findall("./seclabel[@model='dac']/label"):
        uid, _, gid = (label.text or "").lstrip("+").partition(":")
        with contextlib.suppress(ValueError):
            return int(uid), int(gid.lstrip("+"))
    return None


def check_reachable(dom: Any, folder: Path) -> None:
    """Refuse, before anything is created, a folder QEMU cannot reach (one line naming the parent)."""
    ids = qemu_ids(dom)
    if ids is None or ids[0] == 0:
        return
    blocked = unsearchable_parent(folder, *ids)
    if blocked is not None:
        mode = stat.S_IMODE(blocked.stat().st_mode)
        raise errors.UsageError(reason=f"--push: QEMU runs as uid {ids[0]} and cannot reach {folder}: {blocked} "
                                       f"is not searchable by it (mode {mode:04o}); use a folder QEMU can "
                                       "reach, or pull mode (no --push)")


def unsearchable_parent(folder: Path, uid: int, gid: int) -> Path | None:
    """The first parent of ``folder`` that user ``uid`` (group ``gid``) may not search, None if none."""
    for parent in reversed(Path(os.path.abspath(folder)).parents):
        st = parent.stat()
        bit = stat.S_IXUSR if st.st_uid == uid else stat.S_IXGRP if st.st_gid == gid else stat.S_IXOTH
        if not st.st_mode & bit:
            return parent
    return None


@contextlib.contextmanager
def searchable(folder: Path) -> Iterator[None]:
    """``folder`` gets the search bit for group and others (never read) while the block runs."""
    mode = stat.S_IMODE(folder.stat().st_mode)
    wanted = mode | stat.S_IXGRP | stat.S_IXOTH
    if wanted != mode:
        folder.chmod(wanted)
    try:
        yield
    finally:
        if wanted != mode:
            with contextlib.suppress(OSError):
                folder.chmod(mode)
