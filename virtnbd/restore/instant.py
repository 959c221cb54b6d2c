"""``virtnbdrestore -a instant``: the domain runs at once on the backup point, its disks are copied
to their final images in the background (libvirt block copy) and switched over while it runs.

Order: serve + overlay + start (``live.booted``), one block copy per disk onto
``OUT/<disk>.<format>`` (libvirt creates the file; ``--bandwidth`` limits it), wait
until every copy mirrors its disk, then pivot every disk; only then is the domain kept
and nbdkit stopped. Any failure or SIGINT/SIGTERM before every disk pivoted destroys
and undefines the new domain and removes the partial images (a SIGKILL: the guard does
it); the backup set is only read. Guest writes made during the copy go to the overlay
and are mirrored into the final image by QEMU, so the switched-over image holds them.
"""
from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from collections.abc import Mapping
from typing import Any

import libvirt

from virtnbd import errors
from virtnbd.restore import bootxml, live
from virtnbd.restore.options import RestoreOptions
from virtnbd.restore.source import Selection
from virtnbd.virt.connection import reason

log = logging.getLogger(__name__)
POLL = 0.2
REPORT_EVERY = 5.0
MiB = 1024 * 1024


def finals_for(selection: Selection, options: RestoreOptions) -> dict[str, str]:
    """Final image per disk: ``OUT/<disk>.<format>``; an existing one is never overwritten."""
    out = str(options.output)
    finals = {c.disk: os.path.join(os.path.abspath(out), f"{c.disk}.{options.format}") for c in selection.disks}
    for path in finals.values():
        if os.path.lexists(path):
            raise errors.StorageError(path=path, reason="exists: refusing to overwrite it")
    return finals


def run(selection: Selection, options: RestoreOptions) -> None:
    started = time.monotonic()
    if options.no_migrate:
        _run_on_backup(selection, options, started)
        return
    try:
        os.makedirs(str(options.output), exist_ok=True)
    except OSError as err:
        raise errors.StorageError(path=str(options.output), reason=err.strerror or str(err)) from err
    finals = finals_for(selection, options)
    name = live.domain_name(live.saved_xml(selection), options.name, "restore_")
    plan = live.LivePlan(name=name, uri=options.uri, work_parent=str(options.output), paused=options.paused,
                         partial=tuple(finals.values()), console_dir=str(options.output))
    with live.booted(selection, plan, started) as booted:
        _say(f"{name}: {'paused' if options.paused else 'running'} on the backup after {booted.seconds:.1f} s; "
             f"copying {len(finals)} disk(s) in the background")
        copy_and_switch(booted.dom, finals, options)
        booted.keep()
    _say(f"{name}: switched over to {', '.join(finals.values())} after {time.monotonic() - started:.1f} s; "
         f"export stopped")


def _run_on_backup(selection: Selection, options: RestoreOptions, started: float) -> None:
    """``--no-migrate``: a transient domain on the backup until it stops or the command is stopped."""
    name = live.domain_name(live.saved_xml(selection), options.name, "restore_")
    plan = live.LivePlan(name=name, uri=options.uri, work_parent=options.output or tempfile.gettempdir(),
                         persistent=False, paused=options.paused)
    with live.booted(selection, plan, started) as booted:
        _say(f"{name}: {'paused' if options.paused else 'running'} on the backup after {booted.seconds:.1f} s "
             f"(--no-migrate: its writes are discarded); stop it with Ctrl-C or SIGTERM")
        while _active(booted.dom):
            time.sleep(0.5)
    _say(f"{name}: stopped by the guest; export stopped")


def _active(dom: Any) -> bool:
    try:
        return bool(dom.isActive())
    except libvirt.libvirtError:        # a transient domain that stopped is gone
        return False


def _say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def copy_and_switch(dom: Any, finals: Mapping[str, str], options: RestoreOptions) -> None:
    params = {libvirt.VIR_DOMAIN_BLOCK_COPY_BANDWIDTH: options.bandwidth * MiB} if options.bandwidth else {}
    for dev, path in finals.items():
        try:
            dom.blockCopy(dev, bootxml.block_copy_dest(path, options.format), params,
                          libvirt.VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB)
        except libvirt.libvirtError as err:
            raise errors.RestoreError(reason=f"{dev}: block copy to {path} refused: {reason(err)}") from err
    _wait_ready(dom, list(finals))
    for dev in finals:
        _pivot(dom, dev)
    left = bootxml.nbd_sockets(dom.XMLDesc(0))
    if left:
        raise errors.RestoreError(reason=f"after the switch-over the domain still reads {', '.join(left)}")


def _wait_ready(dom: Any, devs: list[str]) -> None:
    last = time.monotonic()
    while True:
        infos = {dev: _job(dom, dev) for dev in devs}
        if all(i["end"] > 0 and i["cur"] == i["end"] for i in infos.values()):
            return
        if time.monotonic() - last >= REPORT_EVERY:
            last = time.monotonic()
            log.info("copying: %s", ", ".join(f"{d} {i['cur'] / MiB:.0f}/{i['end'] / MiB:.0f} MiB"
                                              for d, i in infos.items()))
        time.sleep(POLL)


def _job(dom: Any, dev: str) -> dict[str, int]:
    try:
        info = dom.blockJobInfo(dev, 0)
    except libvirt.libvirtError as err:
        raise errors.RestoreError(reason=f"{dev}: block copy: {reason(err)}") from err
    if not info:
        raise errors.RestoreError(reason=f"{dev}: the block copy ended before the switch-over "
                                         "(libvirtd's log and the domain's QEMU log say why)")
    return {"cur": int(info["cur"]), "end": int(info["end"])}


def _pivot(dom: Any, dev: str) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            dom.blockJobAbort(dev, libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT)
            log.info("%s: switched over", dev)
            return
        except libvirt.libvirtError as err:      # not ready yet: the guest wrote since the last look
            if time.monotonic() > deadline or not _job(dom, dev):
                raise errors.RestoreError(reason=f"{dev}: switch-over failed: {reason(err)}") from err
            time.sleep(POLL)
