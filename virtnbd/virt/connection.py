"""Connection to libvirt and domain lookup, with libvirt errors turned into ours."""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import libvirt

from virtnbd import errors

log = logging.getLogger(__name__)

DEFAULT_URI = "qemu:///system"


def _quiet_handler(_ctx: Any, _err: Any) -> None:
    """libvirt prints every error to stderr by default; we report them ourselves."""


libvirt.registerErrorHandler(_quiet_handler, None)


def reason(err: libvirt.libvirtError) -> str:
    return str(err.get_error_message() or err)


@contextlib.contextmanager
def connect(uri: str | None = None) -> Iterator[libvirt.virConnect]:
    """Open a read-write libvirt connection; always closed on exit."""
    target = uri or DEFAULT_URI
    try:
        conn = libvirt.open(target)
    except libvirt.libvirtError as err:
        raise errors.LibvirtError(reason=f"cannot connect to {target}: {reason(err)}") from err
    try:
        yield conn
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()


def lookup_domain(conn: libvirt.virConnect, name: str) -> libvirt.virDomain:
    """The domain by name (or UUID); DomainNotFound when there is none."""
    try:
        return conn.lookupByName(name)
    except libvirt.libvirtError as err:
        if err.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
            raise errors.LibvirtError(reason=reason(err)) from err
    try:
        return conn.lookupByUUIDString(name)
    except libvirt.libvirtError as err:
        raise errors.DomainNotFound(domain=name) from err


def is_running(dom: libvirt.virDomain) -> bool:
    state, _reason = dom.state()
    return state in (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_BLOCKED)


def domain_xml(dom: libvirt.virDomain, inactive: bool = False) -> str:
    """The domain XML without secrets (no VIR_DOMAIN_XML_SECURE): it goes into the backup folder."""
    try:
        return dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0)
    except libvirt.libvirtError as err:
        raise errors.LibvirtError(reason=f"cannot read XML of domain {dom.name()}: {reason(err)}") from err
