"""Boot a backup point without restoring it: every disk served by nbdkit, a local overlay on top.

:func:`booted` serves each disk of the selected point with ``virtnbdmap``'s nbdkit
(our plugin, read-only: the set is never written), makes an empty qcow2 overlay per
disk, and starts the adjusted domain on the overlays (``bootxml``). A guard process
(``guard``) watches the command: if it dies by SIGKILL, the guard stops the domain.
On leaving the block the domain is destroyed (and undefined when it was defined),
unless the caller kept it (``Booted.keep``: the disks switched over to final images);
nbdkit is stopped and the overlays, sockets and consoles are removed in every case.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import libvirt

from virtnbd import errors
from virtnbd.access.options import MapOptions
from virtnbd.access.serve import serving
from virtnbd.restore import bootxml, config
from virtnbd.restore.guard import Guard, GuardPlan
from virtnbd.restore.source import Selection, domain_xml_of
from virtnbd.virt.connection import connect, reason

log = logging.getLogger(__name__)
TRAVERSE = 0o711        # QEMU (libvirt-qemu) must reach overlays and sockets in our folders


@dataclass(frozen=True)
class LivePlan:
    name: str                           # the new domain's name
    uri: str
    work_parent: str                    # where the overlay folder goes
    persistent: bool = True             # defined (instant) or transient (drill)
    isolated: bool = False              # no network cards
    paused: bool = False                # start paused
    partial: tuple[str, ...] = ()       # final images a failure must remove (instant)
    console_dir: str | None = None      # file consoles go here (default: the work folder, removed after)


@dataclass
class Booted:
    dom: Any
    conn: Any
    disks: dict[str, bootxml.OverlayDisk]
    work: str
    seconds: float                      # from the command's start to the domain running
    xml: str
    kept: bool = False
    consoles: list[str] = field(default_factory=list)

    def keep(self) -> None:
        """Every disk switched over: leave the domain running when the block ends."""
        self.kept = True

    def console_tail(self, size: int = 300) -> str:
        text = ""
        for path in self.consoles:
            with contextlib.suppress(OSError), open(path, "rb") as f:
                text += f.read().decode(errors="replace")
        return " | ".join(line.strip() for line in text[-size:].splitlines() if line.strip())


def saved_xml(selection: Selection) -> str:
    point = selection.points[-1]
    xml = domain_xml_of(selection.bset or selection.folder, point)
    if not xml:
        raise errors.RestoreError(reason=f"point {point.name} holds no domain XML: it cannot be booted")
    return xml


def domain_name(xml: str, name: str | None, prefix: str) -> str:
    return name or f"{prefix}{config._parse(xml).findtext('name') or 'domain'}"


def _workdir(parent: str, prefix: str) -> str:
    try:
        os.makedirs(parent, exist_ok=True)
        path = tempfile.mkdtemp(prefix=prefix, dir=parent)
        os.chmod(path, TRAVERSE)
    except OSError as err:
        raise errors.StorageError(path=parent, reason=err.strerror or str(err)) from err
    return path


def _overlay(path: str, size: int) -> None:
    proc = subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path, str(size)], capture_output=True,
                          text=True, check=False)
    if proc.returncode != 0:
        raise errors.StorageError(path=path, reason=proc.stderr.strip() or "qemu-img create failed")


def _serve_disks(selection: Selection, work: str, sockets: str, stack: contextlib.ExitStack
                 ) -> dict[str, bootxml.OverlayDisk]:
    point = selection.points[-1].name
    disks = {}
    for chain in selection.disks:
        socket = os.path.join(sockets, f"{chain.disk}.sock")
        stack.enter_context(serving(MapOptions(input=selection.folder, until=point, disk=chain.disk, socket=socket)))
        overlay = os.path.join(work, f"{chain.disk}.overlay.qcow2")
        _overlay(overlay, chain.files[-1].entry.virtual_size)
        disks[chain.disk] = bootxml.OverlayDisk(chain.disk, overlay, socket)
    return disks


def _refuse_existing(conn: Any, name: str) -> None:
    with contextlib.suppress(libvirt.libvirtError):
        conn.lookupByName(name)
        raise errors.UsageError(reason=f"domain {name} exists: choose another name with -N")


def _start(conn: Any, xml: str, plan: LivePlan) -> Any:
    flags = libvirt.VIR_DOMAIN_START_PAUSED if plan.paused else 0
    try:
        if not plan.persistent:
            return conn.createXML(xml, flags)
        dom = conn.defineXML(xml)
    except libvirt.libvirtError as err:
        raise errors.LibvirtError(reason=f"cannot start {plan.name}: {reason(err)}") from err
    try:
        dom.createWithFlags(flags)
    except libvirt.libvirtError as err:
        with contextlib.suppress(libvirt.libvirtError):
            dom.undefine()
        raise errors.LibvirtError(reason=f"cannot start {plan.name}: {reason(err)}") from err
    return dom


def _tear_down(booted: Booted | None, conn: Any, plan: LivePlan) -> None:
    dom = booted.dom if booted is not None else None
    if dom is None:
        with contextlib.suppress(libvirt.libvirtError):
            dom = conn.lookupByName(plan.name)
    if dom is not None:
        with contextlib.suppress(libvirt.libvirtError):
            if dom.isActive():
                dom.destroy()
        if plan.persistent:
            with contextlib.suppress(libvirt.libvirtError):
                dom.undefine()
    for path in plan.partial:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


@contextlib.contextmanager
def booted(selection: Selection, plan: LivePlan, started: float) -> Iterator[Booted]:
    """The domain running on overlays over the point's NBD exports (see the module text)."""
    xml = saved_xml(selection)
    work = _workdir(plan.work_parent, ".virtnbd-live-")
    sockets = _workdir(tempfile.gettempdir(), "vnbd-")         # short: unix socket paths are limited
    guard = Guard(GuardPlan(plan.uri, plan.name, plan.persistent, plan.partial, (work, sockets)))
    result: Booted | None = None
    try:
        with connect(plan.uri) as conn, contextlib.ExitStack() as stack:
            _refuse_existing(conn, plan.name)
            try:
                result = _boot(conn, selection, xml, plan, work, sockets, stack, started)
                yield result
            finally:
                if result is None or not result.kept:
                    _tear_down(result, conn, plan)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(sockets, ignore_errors=True)
        guard.done()


def _boot(conn: Any, selection: Selection, xml: str, plan: LivePlan, work: str, sockets: str,  # noqa: PLR0917
          stack: contextlib.ExitStack, started: float) -> Booted:
    disks = _serve_disks(selection, work, sockets, stack)
    adjusted = config.adjust(xml, plan.name, {d: (o.overlay, "qcow2") for d, o in disks.items()})
    final = bootxml.overlay_xml(adjusted, disks, plan.console_dir or work, isolated=plan.isolated)
    dom = _start(conn, final, plan)
    seconds = time.monotonic() - started
    log.info("domain %s %s on point %s of %s (%.1f s)", plan.name, "paused" if plan.paused else "running",
             selection.points[-1].name, selection.folder, seconds)
    return Booted(dom, conn, disks, work, seconds, final, consoles=bootxml.console_files(final))


def disk_names(selection: Selection) -> Sequence[str]:
    return [c.disk for c in selection.disks]
