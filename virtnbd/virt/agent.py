"""Application-consistent backup points through the QEMU guest agent.

:func:`quiesced` wraps the start of the backup job (``backupBegin``, nothing
else): it freezes the guest's filesystems (``fsFreeze``) just before and thaws
them (``fsThaw``) right after, so the point the job captures holds everything
the guest had written, also what still sat in its page cache. Guest facts
(OS, hostname, filesystems) are read first: a frozen agent refuses most commands.

When there is no agent channel, or the agent does not answer within the
timeout, a WARNING is logged and the point is crash-consistent. ``--pause``
suspends the domain around the job start instead (for guests without agent).

Thaw/resume is always attempted, also when freezing or the job start failed,
and SIGINT/SIGTERM that arrive inside the window are held back until the
guest is thawed and then delivered (they raise :class:`errors.Interrupted`).
"""
from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, TypeVar

import libvirt
import libvirt_qemu
from lxml import etree

from virtnbd import errors
from virtnbd.virt.quiesceoptions import QuiesceOptions

log = logging.getLogger(__name__)

AGENT_CHANNEL = "org.qemu.guest_agent.0"

FILESYSTEM = "filesystem"   # guest filesystems frozen at the point
CRASH = "crash"             # as if the power was cut at the point
PAUSED = "paused"           # domain suspended at the point (no agent involved)
OFFLINE = "offline"         # domain not running: disks as it left them
CONSISTENCIES = (FILESYSTEM, CRASH, PAUSED, OFFLINE)

GUEST_INFO_TYPES = (libvirt.VIR_DOMAIN_GUEST_INFO_OS | libvirt.VIR_DOMAIN_GUEST_INFO_HOSTNAME
                    | libvirt.VIR_DOMAIN_GUEST_INFO_TIMEZONE)
PING = '{"execute": "guest-ping"}'
LIBVIRT_GRACE = 5.0         # beyond the agent timeout, for libvirt to get the domain's agent job
THAW_ATTEMPTS = 3
THAW_RETRY_DELAY = 1.0

T = TypeVar("T")


@dataclass
class Quiesced:
    """What :func:`quiesced` did; read it after the ``with`` block."""

    consistency: str = CRASH
    guest_info: dict[str, Any] = field(default_factory=dict)
    frozen_seconds: float = 0.0
    frozen_filesystems: int = 0

    def record(self) -> dict[str, Any]:
        """Plain data for the manifest (``Point.extra``)."""
        out: dict[str, Any] = {"consistency": self.consistency}
        if self.consistency == FILESYSTEM:
            out["frozen_seconds"] = round(self.frozen_seconds, 3)
            out["frozen_filesystems"] = self.frozen_filesystems
        if self.guest_info:
            out["guest"] = self.guest_info
        return out


class AgentUnavailable(errors.AgentError):
    template = "guest agent of {domain}: {reason}"


class AgentTimeout(AgentUnavailable):
    """The agent did not answer in time (hung, or the guest is too busy)."""


# --------------------------------------------------------------------------
# facts about the domain


def _reason(err: libvirt.libvirtError) -> str:
    return str(err.get_error_message() or err)


def channel_state(dom: libvirt.virDomain) -> str | None:
    """State of the agent channel in the live XML.

    None: the domain has no agent channel; "connected"/"disconnected" as
    libvirt reports it (qemu-ga has the port open or not); "" unknown.
    """
    root = etree.fromstring(dom.XMLDesc(0).encode())
    for target in root.iterfind("devices/channel/target"):
        if target.get("type") == "virtio" and target.get("name") == AGENT_CHANNEL:
            return str(target.get("state") or "")
    return None


def _bounded(fn: Callable[[], T], timeout: float, what: str) -> T:
    """Run a blocking libvirt call in a daemon thread; give up after ``timeout``.

    libvirt cannot cancel an agent command; a call that is given up on ends
    on its own (libvirt's guest-sync times out after a few seconds).
    """
    result: list[T] = []
    failure: list[libvirt.libvirtError] = []

    def target() -> None:
        try:
            result.append(fn())
        except libvirt.libvirtError as err:   # handed over to the caller below
            failure.append(err)

    thread = threading.Thread(target=target, name=f"agent-{what}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"no answer to {what} within {timeout:g}s")
    if failure:
        raise failure[0]
    if not result:
        raise errors.AgentError(reason=f"{what} failed (see the traceback above)")
    return result[0]


def _flat_to_guest_info(flat: dict[str, Any]) -> dict[str, Any]:
    """libvirt's flat ``guestInfo`` keys ("os.id", "fs.0.mountpoint") as nested plain data."""
    info: dict[str, Any] = {}
    os_info = {k[3:]: v for k, v in flat.items() if k.startswith("os.")}
    if os_info:
        info["os"] = os_info
    if "hostname" in flat:
        info["hostname"] = flat["hostname"]
    tz = {k[9:]: v for k, v in flat.items() if k.startswith("timezone.")}
    if tz:
        info["timezone"] = tz
    if "fs.count" in flat:
        filesystems = []
        for i in range(int(flat["fs.count"])):
            prefix = f"fs.{i}."
            fs = {k[len(prefix):]: v for k, v in flat.items()
                  if k.startswith(prefix) and not k[len(prefix):].startswith("disk.")}
            disks = [flat.get(f"{prefix}disk.{j}.alias") for j in range(int(flat.get(f"{prefix}disk.count", 0)))]
            if disks:
                fs["disks"] = [d for d in disks if d]
            filesystems.append(fs)
        info["filesystems"] = filesystems
    return info


def _agent_command(dom: libvirt.virDomain, command: str, timeout: int) -> str:
    return str(libvirt_qemu.qemuAgentCommand(dom, command, timeout, 0))


def ping(dom: libvirt.virDomain, timeout: int) -> None:
    """``guest-ping`` with libvirt's own command timeout.

    The official agent APIs (guestInfo, fsFreeze) wait forever for a hung
    agent and keep the domain's agent job while they wait; that would block
    every later agent call and even the end of the backup job. A timed-out
    agent command returns and releases the job. AgentUnavailable when the
    agent does not answer.
    """
    name = dom.name()
    try:
        _bounded(lambda: _agent_command(dom, PING, timeout), timeout + LIBVIRT_GRACE, "guest-ping")
    except TimeoutError as err:
        raise AgentTimeout(domain=name, reason=str(err)) from err
    except libvirt.libvirtError as err:
        raise AgentTimeout(domain=name, reason=f"no answer to guest-ping within {timeout}s ({_reason(err)})") from err


def guest_info(dom: libvirt.virDomain, timeout: float) -> dict[str, Any]:
    """OS, hostname, timezone and filesystems as the agent reports them.

    Raises :class:`AgentUnavailable` when the agent does not answer. The
    filesystem list is best effort (some agents lack guest-get-fsinfo).
    """
    name = dom.name()
    try:
        flat = _bounded(lambda: dom.guestInfo(GUEST_INFO_TYPES, 0), timeout, "guest-info")
    except TimeoutError as err:
        raise AgentTimeout(domain=name, reason=str(err)) from err
    except libvirt.libvirtError as err:
        if err.get_error_code() == libvirt.VIR_ERR_AGENT_UNRESPONSIVE:
            raise AgentTimeout(domain=name, reason=_reason(err)) from err
        raise AgentUnavailable(domain=name, reason=_reason(err)) from err
    try:
        flat.update(_bounded(lambda: dom.guestInfo(libvirt.VIR_DOMAIN_GUEST_INFO_FILESYSTEM, 0), timeout, "fsinfo"))
    except (TimeoutError, libvirt.libvirtError) as err:
        log.debug("guest agent of %s: no filesystem list: %s", name, err)
    return _flat_to_guest_info(flat)


def _domain_state(dom: libvirt.virDomain) -> int:
    state, _reason_code = dom.state()
    return int(state)


# --------------------------------------------------------------------------
# signals held back inside the freeze window


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT/SIGTERM until the block is left, then deliver them.

    The guest must never stay frozen because a signal hit between freeze and
    thaw. Outside the main thread (no handlers there) this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []

    def hold(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %s arrives while the guest is quiesced: handled after thaw", signal.Signals(signum).name)
        pending.append(signum)

    saved = {s: signal.signal(s, hold) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        if pending:
            signal.raise_signal(pending[0])


# --------------------------------------------------------------------------
# freeze / thaw / pause


def _thaw(dom: libvirt.virDomain, attempts: int = THAW_ATTEMPTS) -> None:
    """Thaw all guest filesystems; retried, AgentError when every attempt failed."""
    last = "unknown"
    for attempt in range(1, attempts + 1):
        try:
            dom.fsThaw(None, 0)
            return
        except libvirt.libvirtError as err:
            last = _reason(err)
            log.debug("guest agent of %s: thaw attempt %d failed: %s", dom.name(), attempt, last)
            if attempt < attempts:
                time.sleep(THAW_RETRY_DELAY)
    raise errors.AgentError(reason=f"cannot thaw the filesystems of {dom.name()}: {last}; "
                                   f"the guest may still be frozen: run 'virsh domfsthaw {dom.name()}'")


def _freeze(dom: libvirt.virDomain, mountpoints: tuple[str, ...]) -> int:
    """Freeze; number of filesystems frozen. AgentUnavailable when the agent refuses."""
    try:
        return int(dom.fsFreeze(list(mountpoints) or None, 0))
    except libvirt.libvirtError as err:
        raise AgentUnavailable(domain=dom.name(), reason=f"cannot freeze filesystems: {_reason(err)}") from err


def _agent_ready(dom: libvirt.virDomain, options: QuiesceOptions, result: Quiesced, warn: bool) -> bool:
    """Gather guest facts; True when the agent answered."""
    name = dom.name()
    report = log.warning if warn else log.info
    state = channel_state(dom)
    if state is None:
        report("domain %s has no guest agent channel (%s): the backup is crash-consistent", name, AGENT_CHANNEL)
        return False
    if state == "disconnected":
        report("guest agent of %s is not connected (not running in the guest?): the backup is crash-consistent",
               name)
        return False
    try:
        ping(dom, options.timeout)
        result.guest_info = guest_info(dom, options.timeout)
    except AgentUnavailable as err:
        if isinstance(err, AgentTimeout) or not _recover_stale_freeze(dom, options.timeout):
            report("%s: the backup is crash-consistent", err)
            return False
        try:
            result.guest_info = guest_info(dom, options.timeout)
        except AgentUnavailable as err2:
            report("%s: the backup is crash-consistent", err2)
            return False
    return True


def _recover_stale_freeze(dom: libvirt.virDomain, timeout: float) -> bool:
    """A guest left frozen (e.g. by a killed run) refuses info commands: thaw it. True when it was frozen."""
    try:
        thawed = int(_bounded(lambda: dom.fsThaw(None, 0), timeout, "thaw"))
    except (TimeoutError, libvirt.libvirtError) as err:
        log.debug("guest agent of %s: thaw probe failed: %s", dom.name(), err)
        return False
    if thawed > 0:
        log.warning("guest %s was left with %d frozen filesystem(s): thawed them", dom.name(), thawed)
        return True
    return False


@contextlib.contextmanager
def _frozen(dom: libvirt.virDomain, options: QuiesceOptions, result: Quiesced) -> Iterator[None]:
    """Freeze, run the block, thaw (always: also after a failed freeze or a failed block).

    A thaw that fails after a good freeze raises AgentError (the guest may be
    stuck frozen: the admin must know); after a failed freeze it is a warning.
    """
    name = dom.name()
    with _signals_held():
        t0 = time.monotonic()
        frozen = False
        try:
            try:
                count = _freeze(dom, options.mountpoints)
                frozen = True
            except AgentUnavailable as err:
                log.warning("%s: the backup is crash-consistent", err)
                count = 0
            wanted = len(options.mountpoints)
            if frozen and count > 0 and count >= wanted:
                result.consistency = FILESYSTEM
                result.frozen_filesystems = count
            elif frozen:
                log.warning("guest agent of %s froze %d filesystem(s)%s: the backup is crash-consistent", name, count,
                            f" of {wanted} requested ({', '.join(options.mountpoints)})" if wanted else "")
            yield
        except BaseException:
            try:
                _thaw(dom, THAW_ATTEMPTS if frozen else 1)
            except errors.AgentError as err:
                log.error("%s", err)
            raise
        else:
            try:
                _thaw(dom, THAW_ATTEMPTS if frozen else 1)
            except errors.AgentError as err:
                if frozen:
                    raise
                log.warning("%s", err)
        finally:
            result.frozen_seconds = time.monotonic() - t0
            if frozen:
                log.info("guest filesystems of %s frozen for %.3f s (%d filesystem(s))",
                         name, result.frozen_seconds, count)


@contextlib.contextmanager
def _paused(dom: libvirt.virDomain, result: Quiesced) -> Iterator[None]:
    name = dom.name()
    with _signals_held():
        t0 = time.monotonic()
        suspended = False
        try:
            try:
                dom.suspend()
            except libvirt.libvirtError as err:
                raise errors.LibvirtError(reason=f"cannot suspend domain {name}: {_reason(err)}") from err
            suspended = True
            result.consistency = PAUSED
            yield
        finally:
            if suspended:
                try:
                    dom.resume()
                except libvirt.libvirtError as err:
                    raise errors.LibvirtError(reason=f"cannot resume domain {name}: {_reason(err)}; "
                                                     f"run 'virsh resume {name}'") from err
                result.frozen_seconds = time.monotonic() - t0
                log.info("domain %s paused for %.3f s", name, result.frozen_seconds)


@contextlib.contextmanager
def quiesced(dom: libvirt.virDomain, options: QuiesceOptions) -> Iterator[Quiesced]:
    """Wrap ``backupBegin`` so the point it takes is as consistent as possible.

    Yields a :class:`Quiesced` whose ``consistency`` is final inside the block
    ("filesystem", "crash", "paused"; "offline" when the domain is not
    running) and whose ``frozen_seconds`` is set when the block is left.
    """
    result = Quiesced()
    name = dom.name()
    state = _domain_state(dom)
    if state in (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTDOWN, libvirt.VIR_DOMAIN_CRASHED):
        result.consistency = OFFLINE
        yield result
        return
    running = state in (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_BLOCKED)
    if options.pause:
        if running:
            _agent_ready(dom, options, result, warn=False)
            with _paused(dom, result):
                yield result
            return
        log.info("domain %s is already paused: the backup is taken as it is", name)
        result.consistency = PAUSED
        yield result
        return
    if not running:
        log.warning("domain %s is not running (state %d): cannot freeze, the backup is crash-consistent", name, state)
        yield result
        return
    if not options.freeze:
        log.info("freeze disabled (--no-freeze): the backup of %s is crash-consistent", name)
        if channel_state(dom) == "connected":
            with contextlib.suppress(AgentUnavailable):
                ping(dom, options.timeout)
                result.guest_info = guest_info(dom, options.timeout)
        yield result
        return
    if not _agent_ready(dom, options, result, warn=True):
        yield result
        return
    with _frozen(dom, options, result):
        yield result
