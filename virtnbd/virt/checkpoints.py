"""libvirt checkpoints: ours (``virtnbdbackup.N``) versus foreign, delete, redefine, size."""
from __future__ import annotations

import logging
import re
import time

import libvirt

from virtnbd import errors
from virtnbd.virt import xmlbuild
from virtnbd.virt.connection import reason

log = logging.getLogger(__name__)

PREFIX = "virtnbdbackup."
PENDING = "virtnbdbackup.pending"     # bitmap of an offline full until its point commits (then merged into .0)
_SETTLE_TRIES = 8
_SETTLE_DELAY = 0.25
_OURS = re.compile(r"^virtnbdbackup\.(\d+)$")


def checkpoint_name(index: int) -> str:
    return f"{PREFIX}{index}"


def index_of(name: str) -> int | None:
    match = _OURS.match(name)
    return int(match.group(1)) if match else None


def is_ours(name: str) -> bool:
    return index_of(name) is not None


def list_names(dom: libvirt.virDomain) -> list[str]:
    try:
        return [cp.getName() for cp in dom.listAllCheckpoints(0)]
    except libvirt.libvirtError as err:
        raise errors.LibvirtError(reason=f"cannot list checkpoints of {dom.name()}: {reason(err)}") from err


def list_ours(dom: libvirt.virDomain) -> list[str]:
    """Our checkpoints, oldest (lowest index) first."""
    ours = [n for n in list_names(dom) if is_ours(n)]
    return sorted(ours, key=lambda n: index_of(n) or 0)


def list_foreign(dom: libvirt.virDomain) -> list[str]:
    return [n for n in list_names(dom) if not is_ours(n)]


def _lookup(dom: libvirt.virDomain, name: str) -> libvirt.virDomainCheckpoint:
    try:
        return dom.checkpointLookupByName(name, 0)
    except libvirt.libvirtError as err:
        if err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_CHECKPOINT:
            raise errors.CheckpointError(
                checkpoint=name,
                reason=f"missing in libvirt for domain {dom.name()} (lost checkpoint metadata? "
                       f"start a new chain with -l full into a new folder)") from err
        raise errors.CheckpointError(checkpoint=name, reason=reason(err)) from err


def exists(dom: libvirt.virDomain, name: str) -> bool:
    return name in list_names(dom)


def get_xml(dom: libvirt.virDomain, name: str, with_size: bool = False) -> str:
    flags = libvirt.VIR_DOMAIN_CHECKPOINT_XML_SIZE if with_size else 0
    try:
        return str(_lookup(dom, name).getXMLDesc(flags))
    except libvirt.libvirtError as err:
        raise errors.CheckpointError(checkpoint=name, reason=reason(err)) from err


def dirty_sizes(dom: libvirt.virDomain, name: str) -> dict[str, int]:
    """Bytes changed per disk since checkpoint ``name`` (needs a running domain)."""
    return xmlbuild.checkpoint_sizes(get_xml(dom, name, with_size=True))


def delete(dom: libvirt.virDomain, name: str) -> None:
    """Delete one checkpoint; its bitmap is merged into its parent's by libvirt."""
    for attempt in range(_SETTLE_TRIES):
        try:
            dom.checkpointLookupByName(name, 0).delete(0)
        except libvirt.libvirtError as err:
            if err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_CHECKPOINT:
                log.debug("checkpoint %s already gone", name)
                return
            if not _bitmap_gone(err):
                raise errors.CheckpointError(checkpoint=name, reason=f"cannot delete: {reason(err)}") from err
            if attempt + 1 < _SETTLE_TRIES:
                # libvirtd may still be rolling back the checkpoint of a killed client's backupBegin
                # (bitmap gone first, metadata next): let it finish before touching the metadata
                time.sleep(_SETTLE_DELAY)
                continue
            delete_metadata(dom, name)
            log.warning("checkpoint %s: its bitmap was already gone (%s); removed its metadata", name, reason(err))
            return
        log.debug("deleted checkpoint %s", name)
        return


def _bitmap_gone(err: libvirt.libvirtError) -> bool:
    """libvirt cannot delete a checkpoint whose bitmap somebody removed ("bitmap ... not found")."""
    text = reason(err)
    return "bitmap" in text and "not found" in text


def delete_metadata(dom: libvirt.virDomain, name: str) -> None:
    """Forget a checkpoint without touching bitmaps (works while the domain is shut off)."""
    try:
        _lookup(dom, name).delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
    except libvirt.libvirtError as err:
        raise errors.CheckpointError(checkpoint=name, reason=f"cannot delete metadata: {reason(err)}") from err


def delete_ours(dom: libvirt.virDomain, keep: tuple[str, ...] = ()) -> list[str]:
    """Delete our checkpoints newest first (foreign ones are never touched)."""
    removed = []
    for name in reversed(list_ours(dom)):
        if name in keep:
            continue
        delete(dom, name)
        removed.append(name)
    return removed


def delete_newer_than(dom: libvirt.virDomain, index: int) -> list[str]:
    """Delete our checkpoints with an index above ``index``: left by runs that never committed.

    Deleting merges their bitmaps into the parent's, so an inc relative to the
    last committed checkpoint still sees every change.
    """
    removed = []
    for name in reversed(list_ours(dom)):
        if (index_of(name) or 0) > index:
            delete(dom, name)
            removed.append(name)
    return removed


def redefine(dom: libvirt.virDomain, xml: str) -> None:
    """Recreate checkpoint metadata from XML saved in the backup folder."""
    try:
        dom.checkpointCreateXML(xml, libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE)
    except libvirt.libvirtError as err:
        raise errors.CheckpointError(checkpoint="(saved XML)", reason=f"cannot redefine: {reason(err)}") from err
