"""Control of a libvirt push-mode backup job (``--push``): QEMU writes each disk into an image we made.

The job is begun with ``VIR_DOMAIN_BACKUP_BEGIN_REUSE_EXTERNAL`` (libvirt opens our pre-created
targets, overlays keep their relative backing name) and ends by itself; :meth:`PushJob.wait` polls
the job and then reads libvirt's record of the completed job (``VIR_DOMAIN_JOB_STATS_COMPLETED``):
only ``VIR_DOMAIN_JOB_COMPLETED`` with ``success`` counts, anything else (failed, cancelled, no
record after a libvirtd restart) is an error and no point is committed.

An error, SIGINT or SIGTERM aborts the job through the context manager, as in pull mode. A SIGKILL
cannot run cleanup: a guard process (``python -m virtnbd.virt.pushguard``, own session, own
connection) waits on a pipe from us; when the pipe closes without our "done" it aborts the job
if it is still the one it was started for. The next run's :func:`virtnbd.virt.job.abort_stale`
is the last line (a push job is ours when its targets are ``*.qcow2.partial`` files in a backup
folder whose lock no live run holds).
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import libvirt

from virtnbd import errors
from virtnbd.virt.connection import reason
from virtnbd.virt.job import BackupJob

log = logging.getLogger(__name__)

POLL_FIRST = 0.005          # a small inc ends within milliseconds: look often first ...
POLL_MAX = 0.1              # ... then back off


@dataclass(frozen=True)
class PushResult:
    seconds: float
    bytes_total: int          # what QEMU reported to copy (bitmap size for an inc)
    bytes_processed: int


class PushJob(BackupJob):
    """A push-mode backup job; a context manager that aborts it at exit unless it completed."""

    flags = libvirt.VIR_DOMAIN_BACKUP_BEGIN_REUSE_EXTERNAL

    def __init__(self, dom: libvirt.virDomain, targets: Sequence[str] = ()) -> None:
        super().__init__(dom)
        self.targets = list(targets)
        self.guard: subprocess.Popen[bytes] | None = None

    def begin(self, backup_xml: str, checkpoint_xml: str | None = None) -> None:
        self.guard = start_guard(self.dom, self.targets)
        super().begin(backup_xml, checkpoint_xml)

    def wait(self, tick: Callable[[], None] = lambda: None) -> PushResult:
        """Until the job has ended; raise unless it completed successfully. ``tick`` runs every poll
        (connection check, progress) and may raise to stop waiting (the job is then aborted)."""
        started = time.monotonic()
        pause = POLL_FIRST
        while self.stats().active:
            tick()
            time.sleep(pause)
            pause = min(pause * 2, POLL_MAX)
        self.started = False          # ended by itself: nothing to abort any more
        return self._completed(time.monotonic() - started)

    def _completed(self, seconds: float) -> PushResult:
        try:
            info = self.dom.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
        except libvirt.libvirtError as err:
            raise errors.LibvirtError(reason=f"cannot read the result of the push backup job: {reason(err)}") from err
        kind = info.get("type", libvirt.VIR_DOMAIN_JOB_NONE)
        if kind == libvirt.VIR_DOMAIN_JOB_COMPLETED and info.get("success", True):
            return PushResult(seconds, int(info.get("disk_total", 0)), int(info.get("disk_processed", 0)))
        if kind == libvirt.VIR_DOMAIN_JOB_NONE:
            why = "libvirt kept no record of its end (was libvirtd restarted?)"
        else:
            why = str(info.get("errmsg") or _KINDS.get(int(kind), f"job type {kind}"))
        raise errors.LibvirtError(reason=f"push backup job of {self.dom.name()} did not complete: {why}; "
                                         "nothing was committed")

    def abort(self) -> None:
        try:
            super().abort()
        finally:
            self.release_guard()

    def release_guard(self) -> None:
        """Tell the guard we are done with the job (aborted or completed) and let it exit."""
        guard, self.guard = self.guard, None
        if guard is None:
            return
        try:
            if guard.stdin is not None:
                guard.stdin.write(b"done\n")
                guard.stdin.close()
            guard.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            guard.kill()
            guard.wait()


_KINDS = {libvirt.VIR_DOMAIN_JOB_FAILED: "the job failed", libvirt.VIR_DOMAIN_JOB_CANCELLED: "the job was cancelled"}


def start_guard(dom: libvirt.virDomain, targets: Sequence[str]) -> subprocess.Popen[bytes]:
    """The process that aborts the job if we die without saying "done" (see the module doc)."""
    import virtnbd
    root = str(Path(virtnbd.__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    argv = [sys.executable, "-m", "virtnbd.virt.pushguard", dom.connect().getURI(), dom.UUIDString(), *targets]
    try:
        return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env,
                                start_new_session=True, close_fds=True)
    except OSError as err:
        raise errors.LibvirtError(reason=f"cannot start the push job guard: {err.strerror or err}") from err
