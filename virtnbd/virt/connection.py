"""Connection to libvirt and domain lookup, with libvirt errors turned into ours."""
from __future__ import annotations

import contextlib
import logging
import threading
import urllib.parse
from collections.abc import Iterator, Sequence
from typing import Any

import libvirt

from virtnbd import errors
from virtnbd.secrets import read_password_file, redact_uri

log = logging.getLogger(__name__)

DEFAULT_URI = "qemu:///system"


def _quiet_handler(_ctx: Any, _err: Any) -> None:
    """libvirt prints every error to stderr by default; we report them ourselves."""


libvirt.registerErrorHandler(_quiet_handler, None)


def reason(err: libvirt.libvirtError) -> str:
    return str(err.get_error_message() or err)


KEEPALIVE_INTERVAL = 2        # seconds between keepalive probes
KEEPALIVE_COUNT = 3           # unanswered probes before libvirt closes the connection (about 8 s)
_lost: dict[int, str] = {}    # id(conn) -> why its connection closed
_loop_lock = threading.Lock()
_loop_started = threading.Event()


def _run_event_loop() -> None:
    while True:
        libvirt.virEventRunDefaultImpl()


def _start_event_loop() -> None:
    """libvirt's default event loop in a daemon thread: needed for keepalive and the close callback."""
    with _loop_lock:
        if _loop_started.is_set():
            return
        libvirt.virEventRegisterDefaultImpl()
        threading.Thread(target=_run_event_loop, name="libvirt-events", daemon=True).start()
        _loop_started.set()


_CLOSE_REASONS = {0: "error", 1: "end of file (libvirtd stopped or restarted)", 2: "keepalive timeout", 3: "closed"}


def _on_close(conn: libvirt.virConnect, why: int, _opaque: Any) -> None:
    _lost[id(conn)] = _CLOSE_REASONS.get(why, str(why))


def _watch(conn: libvirt.virConnect) -> None:
    try:
        conn.setKeepAlive(KEEPALIVE_INTERVAL, KEEPALIVE_COUNT)
        conn.registerCloseCallback(_on_close, None)
    except libvirt.libvirtError as err:       # e.g. a test driver without keepalive: run unwatched
        log.debug("connection not watched: %s", reason(err))


def lost(conn: libvirt.virConnect) -> bool:
    return id(conn) in _lost


def alive(conn: libvirt.virConnect) -> bool:
    """The connection still works (libvirt's close callback may not have told us yet that it does not)."""
    try:
        return not lost(conn) and conn.isAlive() == 1
    except libvirt.libvirtError:
        return False


def check_alive(conn: libvirt.virConnect) -> None:
    """Raise when libvirt closed the connection (libvirtd restarted or unreachable)."""
    why = _lost.get(id(conn))
    if why is not None:
        raise errors.LibvirtError(reason=f"connection to libvirtd lost during the run ({why}); nothing was "
                                         f"committed: the next run aborts the job left in QEMU and continues "
                                         f"the chain")


def _open(uri: str, password_file: str | None) -> libvirt.virConnect:
    """``libvirt.open``, or ``openAuth`` answering libvirt's password/passphrase questions from the file."""
    if password_file is None:
        return libvirt.open(uri)
    password = read_password_file(password_file)
    user = urllib.parse.urlsplit(uri).username or ""

    def answer(creds: list[list[Any]], _opaque: Any) -> int:
        for cred in creds:
            if cred[0] == libvirt.VIR_CRED_AUTHNAME:
                cred[4] = user or cred[3] or ""
            elif cred[0] in (libvirt.VIR_CRED_PASSPHRASE, libvirt.VIR_CRED_NOECHOPROMPT):
                cred[4] = password
            else:
                return -1
        return 0

    kinds = [libvirt.VIR_CRED_AUTHNAME, libvirt.VIR_CRED_PASSPHRASE, libvirt.VIR_CRED_NOECHOPROMPT]
    return libvirt.openAuth(uri, [kinds, answer, None], 0)


def _open_first(uris: Sequence[str], password_file: str | None) -> libvirt.virConnect:
    """The first of ``uris`` that opens (a remote run's forwarded socket, then libvirt's own transport);
    the error is the last one's."""
    for n, target in enumerate(uris):
        try:
            conn = _open(target, password_file)
        except libvirt.libvirtError as err:
            if n + 1 == len(uris):
                raise errors.LibvirtError(reason=f"cannot connect to {redact_uri(target)}: {reason(err)}") from err
            log.debug("libvirt: %s: %s; trying the next way", redact_uri(target), reason(err))
            continue
        log.debug("libvirt: connected through %s", redact_uri(target))
        return conn
    raise errors.LibvirtError(reason="no libvirt URI to connect to")


@contextlib.contextmanager
def connect(uri: str | Sequence[str] | None = None, password_file: str | None = None) -> Iterator[libvirt.virConnect]:
    """Open a read-write libvirt connection, watched by keepalive and a close callback; closed on exit.

    ``uri``: one URI, or several tried in order (the first that opens is used).
    ``password_file`` (``--password-file``): libvirt's password (and key passphrase) questions are
    answered from it; the password never appears in argv, the URI or a log."""
    _start_event_loop()
    conn = _open_first([uri or DEFAULT_URI] if uri is None or isinstance(uri, str) else list(uri), password_file)
    _watch(conn)
    try:
        yield conn
    finally:
        _lost.pop(id(conn), None)
        with contextlib.suppress(libvirt.libvirtError):
            conn.unregisterCloseCallback()
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
