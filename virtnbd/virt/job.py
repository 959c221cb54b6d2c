"""Control of a libvirt pull-mode backup job: begin, stats, abort (idempotent)."""
from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import libvirt

from virtnbd import errors
from virtnbd.backupset.store import LOCK_FILE, folder_in_use
from virtnbd.virt import xmlbuild
from virtnbd.virt.connection import reason

log = logging.getLogger(__name__)

SOCKET_DIR_PREFIX = "virtnbd."
PUSH_TARGET_SUFFIX = ".qcow2.partial"      # a point image being written (backupset/qcow2set.py)
_OWNER = re.compile(r"/virtnbd\.(\d+)\.[^/]+/[^/]+$")


@dataclass(frozen=True)
class JobStats:
    active: bool
    operation: int | None
    data_total: int | None
    data_processed: int | None


def running_job_xml(dom: libvirt.virDomain) -> str | None:
    """XML of the domain's running backup job, None when there is none."""
    try:
        return str(dom.backupGetXMLDesc(0))
    except libvirt.libvirtError as err:
        if err.get_error_code() in (libvirt.VIR_ERR_NO_DOMAIN_BACKUP, libvirt.VIR_ERR_OPERATION_INVALID):
            return None
        raise errors.LibvirtError(reason=f"cannot query backup job: {reason(err)}") from err


def owner_pid(socket: str | None) -> int | None:
    """PID encoded in a socket path made by :func:`virtnbd.backup.output.socket_dir`."""
    if not socket:
        return None
    match = _OWNER.search(socket)
    return int(match.group(1)) if match else None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def abort_stale(dom: libvirt.virDomain, folder: Path | None = None) -> str | None:
    """Abort a backup job left behind by a killed run of ours.

    Returns the stale socket path (push mode: the first target) when a job was aborted.
    A job of a live process of ours, or a job somebody else started, raises LibvirtError.
    ``folder`` is the backup folder this run holds locked.
    """
    xml = running_job_xml(dom)
    if xml is None:
        return None
    if xmlbuild.push_targets(xml):
        return _abort_stale_push(dom, xmlbuild.push_targets(xml), folder)
    socket = xmlbuild.backup_socket(xml)
    pid = owner_pid(socket)
    if pid is None:
        raise errors.LibvirtError(reason=f"domain {dom.name()} has a running backup job not started by virtnbdbackup "
                                         f"(socket {socket}); abort it with 'virsh domjobabort {dom.name()}'")
    if pid_alive(pid) and pid != os.getpid():
        raise errors.LibvirtError(reason=f"domain {dom.name()} is being backed up by running process {pid}")
    log.warning("aborting stale backup job of killed process %d (socket %s)", pid, socket)
    _abort(dom)
    wait_gone(dom)
    return socket


def _abort_stale_push(dom: libvirt.virDomain, targets: list[str], folder: Path | None) -> str:
    """A push job of ours writes ``*.qcow2.partial`` files into a backup folder; it is stale when
    no live run holds that folder's lock (the folder this run locked: its job died with it)."""
    folders = {Path(t).parent.resolve() for t in targets}
    ours = all(t.endswith(PUSH_TARGET_SUFFIX) for t in targets) and all(
        (f / LOCK_FILE).exists() for f in folders)
    if not ours:
        raise errors.LibvirtError(reason=f"domain {dom.name()} has a running push backup job not started by "
                                         f"virtnbdbackup (target {targets[0]}); abort it with "
                                         f"'virsh domjobabort {dom.name()}'")
    own = folder.resolve() if folder is not None else None
    live = [f for f in folders if f != own and folder_in_use(f)]
    if live:
        raise errors.LibvirtError(reason=f"domain {dom.name()} is being backed up (push mode) into {live[0]} "
                                         "by a running virtnbdbackup")
    log.warning("aborting stale push backup job of a killed run (target %s)", targets[0])
    _abort(dom)
    wait_gone(dom)
    return targets[0]


def refuse_foreign_jobs(dom: libvirt.virDomain, targets: list[str]) -> None:
    """Refuse to start while someone else copies, commits, pulls, migrates or snapshots the domain.

    Called after :func:`abort_stale`, so any job left is not a backup job of ours.
    """
    for target in targets:
        try:
            info = dom.blockJobInfo(target, 0)
        except libvirt.libvirtError as err:
            raise errors.LibvirtError(reason=f"cannot query block jobs of {dom.name()}: {reason(err)}") from err
        if info:
            kind = _BLOCK_JOBS.get(int(info.get("type", 0)), "block")
            raise errors.LibvirtError(
                reason=f"disk {target} of domain {dom.name()} is busy with a {kind} job started by someone else; "
                       f"run the backup when it has finished (virsh blockjob {dom.name()} {target} --info)")
    try:
        job_type = int(dom.jobInfo()[0])
    except libvirt.libvirtError as err:
        raise errors.LibvirtError(reason=f"cannot query jobs of {dom.name()}: {reason(err)}") from err
    if job_type != libvirt.VIR_DOMAIN_JOB_NONE:
        raise errors.LibvirtError(
            reason=f"domain {dom.name()} has a running {_operation(dom)} job started by someone else; "
                   f"run the backup when it has finished (virsh domjobinfo {dom.name()})")


_OPERATIONS = {2: "save", 3: "restore", 4: "incoming migration", 5: "migration", 6: "snapshot",
               7: "snapshot revert", 8: "dump", 9: "backup", 10: "snapshot delete"}


def _operation(dom: libvirt.virDomain) -> str:
    """What the domain's job does (libvirt's job stats), or the kinds it may be."""
    try:
        stats = dom.jobStats(0)
    except libvirt.libvirtError:
        stats = {}
    return _OPERATIONS.get(int(stats.get("operation", 0)), "(migration, snapshot, save or dump)")


_BLOCK_JOBS = {1: "block pull", 2: "block copy", 3: "block commit", 4: "active block commit", 5: "backup"}


def wait_gone(dom: libvirt.virDomain, timeout: float = 30.0) -> None:
    """abortJob() returns before libvirt has torn the job down (seen with whole-disk exports):
    wait, so the next run (or a user) never meets the job of a run that already ended."""
    deadline = time.monotonic() + timeout
    pause = 0.002               # usually gone within a few ms: look often first, then back off
    while running_job_xml(dom) is not None:
        if time.monotonic() > deadline:
            log.warning("backup job of %s still listed %.0fs after abort", dom.name(), timeout)
            return
        time.sleep(pause)
        pause = min(pause * 2, 0.05)


def _abort(dom: libvirt.virDomain) -> bool:
    try:
        dom.abortJob()
    except libvirt.libvirtError as err:
        if err.get_error_code() == libvirt.VIR_ERR_OPERATION_INVALID:   # no job running
            return False
        raise errors.LibvirtError(reason=f"cannot abort backup job: {reason(err)}") from err
    return True


class BackupJob:
    """A pull-mode backup job; a context manager that always aborts it at exit."""

    def __init__(self, dom: libvirt.virDomain) -> None:
        self.dom = dom
        self.started = False

    flags = 0

    def begin(self, backup_xml: str, checkpoint_xml: str | None = None) -> None:
        try:
            self.dom.backupBegin(backup_xml, checkpoint_xml, self.flags)
        except libvirt.libvirtError as err:
            raise errors.LibvirtError(reason=f"cannot start backup job: {reason(err)}") from err
        self.started = True

    def stats(self) -> JobStats:
        try:
            info = self.dom.jobStats(0)
        except libvirt.libvirtError as err:
            raise errors.LibvirtError(reason=f"cannot read job stats: {reason(err)}") from err
        active = info.get("type", libvirt.VIR_DOMAIN_JOB_NONE) != libvirt.VIR_DOMAIN_JOB_NONE
        return JobStats(active=active, operation=info.get("operation"),
                        data_total=info.get("data_total"), data_processed=info.get("data_processed"))

    def abort(self) -> None:
        """End the job. Safe to call twice and when begin() never succeeded."""
        if not self.started:
            return
        self.started = False
        if running_job_xml(self.dom) is None:
            return
        if _abort(self.dom):
            wait_gone(self.dom)
            log.debug("backup job of %s ended", self.dom.name())

    def __enter__(self) -> BackupJob:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        with contextlib.suppress(errors.LibvirtError) if exc is not None else contextlib.nullcontext():
            self.abort()
