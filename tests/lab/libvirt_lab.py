"""Real libvirt/QEMU test lab: daemons, throw-away domains, shadow-disk writer.

Fixtures (imported into tests/conftest.py):

* ``libvirt_daemons`` (session): virtlogd + libvirtd answer on qemu:///system;
  daemons started here are stopped at session end (only those, and only when
  no other lab session still holds the shared lock).
* ``libvirt_conn`` (session): ``libvirt.virConnect`` to qemu:///system.
* ``make_domain`` (function): factory ``make_domain(disks=[DiskSpec(...)],
  start=True) -> LabDomain``; every domain made is destroyed, undefined with
  its checkpoint metadata and its images deleted at test end.

Every domain is ``<domain type='qemu'>`` (never kvm: the host's /dev/kvm hangs
guests), q35, 64 MiB, no graphics, no OS. Disks are changed through the QEMU
monitor's ``qemu-io`` (which marks dirty bitmaps like guest writes) and the
same operation is applied to a raw *shadow* image, so a test always knows the
exact expected bytes of every disk (:class:`ShadowDisk`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.lab.common import KiB, LabError, MiB, require, run
from tests.lab.diskops import (
    ALIGN,
    JOB_SAFE_KINDS,
    Op,
    check_qemu_io_output,
    data_op,
    discard_op,
    done_line,
    pattern_op,
    qemu_io_command,
    random_writes,
    ranges_cover,
    ranges_of,
    zero_op,
)
from tests.lab.images import (
    ImageMismatch,
    assert_bytes_equal,
    compare_images,
    describe_bytes_mismatch,
    describe_mismatch,
    image_format,
    virtual_size,
)

log = logging.getLogger(__name__)

URI = "qemu:///system"
NAME_PREFIX = "vnbdtest-"
OWNER_PREFIX = "virtnbd test lab, owner "
# QEMU runs as libvirt-qemu (Debian default, /etc/libvirt/qemu.conf): images,
# data files and socket folders must be reachable by that user. The pytest
# tmp_path (0700, root) is not, so the lab lives here.
LAB_ROOT = Path(os.environ.get("VNBD_LAB_ROOT", "/var/lib/libvirt/images/vnbdtest"))
LOCK_FILE = Path("/run/vnbdtest-lab.lock")  # shared by every session using the daemons
START_LOCK_FILE = Path("/run/vnbdtest-lab.start.lock")  # held while starting/stopping
EMULATOR = "/usr/bin/qemu-system-x86_64"
DAEMON_LOG_DIR = Path("/var/log/libvirt")
QEMU_LOG_DIR = DAEMON_LOG_DIR / "qemu"


# --------------------------------------------------------------------------
# processes


def pids_of(name: str) -> list[int]:
    """Pids of processes called ``name`` (e.g. the shared libvirtd)."""
    return _pids_of(name)


def _pids_of(name: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            comm = (entry / "comm").read_text().strip()
        except OSError:
            continue
        if comm == name:
            pids.append(int(entry.name))
    return pids


def _pidfile_pid(path: str) -> int | None:
    try:
        return int(Path(path).read_text().strip())
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------
# daemons


def _answers(timeout: float = 10.0) -> bool:
    proc = subprocess.run(
        ["virsh", "-c", URI, "version"], capture_output=True, text=True, timeout=timeout + 5, check=False
    )
    return proc.returncode == 0


@dataclass
class LabDaemons:
    """virtlogd/libvirtd for one pytest session; stops only what it started.

    Two lock files make concurrent sessions safe: every user holds a shared
    lock on ``LOCK_FILE`` for its whole session; ``START_LOCK_FILE`` is held
    exclusively only while checking/starting or stopping. A session stops the
    daemons it started only when it can take ``LOCK_FILE`` exclusively, i.e.
    no other session uses them (``scripts/lab/libvirtd stop`` does the same).
    """

    started: dict[str, int] = field(default_factory=dict)  # name -> pid
    _users_fd: int | None = None

    @staticmethod
    def _open(path: Path) -> int:
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)

    def ensure(self, wait: float = 30.0) -> None:
        start_fd = self._open(START_LOCK_FILE)
        try:
            _flock_within(start_fd, fcntl.LOCK_EX, START_LOCK_FILE)
            self._users_fd = self._open(LOCK_FILE)
            _flock_within(self._users_fd, fcntl.LOCK_SH, LOCK_FILE)
            for name, pidfile in (("virtlogd", "/run/virtlogd.pid"), ("libvirtd", "/run/libvirtd.pid")):
                if not _pids_of(name):
                    self.started[name] = _start_daemon(name, pidfile)
            deadline = time.monotonic() + wait
            while not _answers():
                if time.monotonic() > deadline:
                    raise LabError(f"libvirtd does not answer on {URI} after {wait:.0f}s (log {DAEMON_LOG_DIR})")
                time.sleep(0.2)
        finally:
            os.close(start_fd)

    def release(self) -> None:
        if self._users_fd is None:
            return
        start_fd = self._open(START_LOCK_FILE)
        try:
            _flock_within(start_fd, fcntl.LOCK_EX, START_LOCK_FILE)
            fcntl.flock(self._users_fd, fcntl.LOCK_UN)
            if not self.started:
                return
            try:
                fcntl.flock(self._users_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.warning("lab: another session still uses libvirtd; leaving %s running", sorted(self.started))
                return
            for name in ("libvirtd", "virtlogd"):
                pid = self.started.pop(name, None)
                if pid is not None:
                    _stop_pid(pid)
        finally:
            os.close(self._users_fd)
            self._users_fd = None
            os.close(start_fd)


def _flock_within(fd: int, mode: int, path: Path, wait: float = 120.0) -> None:
    """flock, but give up after ``wait`` seconds with the holders' pids instead of hanging."""
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise LabError(f"{path} still locked after {wait:.0f}s by pids {_lock_holders(path)}") from None
            time.sleep(0.2)


def _lock_holders(path: Path) -> list[int]:
    """Pids with ``path`` open (a daemon that inherited a lock fd shows up here)."""
    holders = []
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        with contextlib.suppress(OSError):
            if any(os.readlink(fd) == str(path) for fd in fd_dir.iterdir()):
                holders.append(int(fd_dir.parent.name))
    return holders


def _start_daemon(name: str, pidfile: str) -> int:
    log.info("lab: starting %s (log %s/%s.log)", name, DAEMON_LOG_DIR, name)
    DAEMON_LOG_DIR.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "LIBVIRT_LOG_OUTPUTS": f"3:file:{DAEMON_LOG_DIR}/{name}.log"}
    subprocess.run([name, "-d"], env=env, check=True, timeout=30, capture_output=True)
    return _wait_pid(name, pidfile)


def _wait_pid(name: str, pidfile: str, wait: float = 15.0) -> int:
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        pid = _pidfile_pid(pidfile)
        if pid and pid in _pids_of(name):
            return pid
        pids = _pids_of(name)
        if pids:
            return pids[0]
        time.sleep(0.1)
    raise LabError(f"{name} did not start")


def _stop_pid(pid: int, wait: float = 10.0) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if not Path(f"/proc/{pid}").exists():
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def restart_libvirtd(sig: int = signal.SIGTERM, wait: float = 30.0) -> float:
    """Kill the shared libvirtd with ``sig`` and start it again at once (scripts/lab/libvirtd start).

    Fault tests only: other sessions' connections break too. Returns the seconds
    libvirtd was away. QEMU processes survive; libvirtd reconnects to them.
    """
    started = time.monotonic()
    for pid in _pids_of("libvirtd"):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + 15
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        if Path(f"/proc/{pid}").exists():
            os.kill(pid, signal.SIGKILL)
    script = Path(__file__).resolve().parents[2] / "scripts" / "lab" / "libvirtd"
    subprocess.run([str(script), "start"], check=True, timeout=wait + 60, capture_output=True)
    deadline = time.monotonic() + wait
    while not _answers():
        if time.monotonic() > deadline:
            raise LabError(f"libvirtd does not answer {wait:.0f}s after a restart")
        time.sleep(0.2)
    return time.monotonic() - started


class LiveConn:
    """qemu:///system that reopens itself when libvirtd was restarted (the session's lab connection)."""

    def __init__(self) -> None:
        import libvirt

        self._conn = libvirt.open(URI)

    def live(self) -> Any:
        import libvirt

        try:
            self._conn.getLibVersion()
        except libvirt.libvirtError:
            with contextlib.suppress(libvirt.libvirtError):
                self._conn.close()
            self._conn = libvirt.open(URI)
        return self._conn

    def __getattr__(self, name: str) -> Any:
        return getattr(self.live(), name)


# --------------------------------------------------------------------------
# lab folders


def make_lab_dir(prefix: str = "") -> Path:
    """A fresh folder QEMU (libvirt-qemu) can read, with a world-writable ``sock/`` inside."""
    LAB_ROOT.mkdir(parents=True, exist_ok=True)
    LAB_ROOT.chmod(0o755)
    path = LAB_ROOT / f"{prefix}{uuid.uuid4().hex[:10]}"
    path.mkdir(mode=0o755)
    path.chmod(0o755)
    sock = path / "sock"
    sock.mkdir()
    sock.chmod(0o1777)
    return path


# --------------------------------------------------------------------------
# disks and domains


@dataclass(frozen=True)
class DiskSpec:
    """One disk of a lab domain. bus: sata | virtio | scsi; fmt: qcow2 | raw."""

    target: str = "sda"
    bus: str = "sata"
    fmt: str = "qcow2"
    size: int = 32 * MiB


class ShadowDisk:
    """A domain disk plus a raw shadow image that always holds its expected bytes."""

    def __init__(self, domain: LabDomain, spec: DiskSpec, image: Path, shadow: Path) -> None:
        self.domain = domain
        self.spec: DiskSpec = spec
        self.image = image
        self.shadow = shadow
        self._counter = 0

    @property
    def target(self) -> str:
        return self.spec.target

    @property
    def size(self) -> int:
        return self.spec.size

    def qdev(self) -> str:
        """The qdev id qemu-io -d needs, from the running domain's alias."""
        alias = self.domain.alias(self.target)
        if self.spec.bus == "virtio":
            return f"/machine/peripheral/{alias}/virtio-backend"
        return alias

    # ---- operations
    def apply(self, op: Op) -> None:
        if op.offset < 0 or op.end > self.size:
            raise ValueError(f"{op} outside disk {self.target} of {self.size} bytes")
        if op.kind == "discard" and self.domain.job_active():
            # Observed with QEMU 7.2: while a backup job runs, a discard through
            # the monitor is silently dropped (the image keeps its data), so
            # the expected bytes would be unknowable. Refuse instead of guessing.
            raise LabError(f"{self.domain.name}: discard while a backup job runs is not applied by QEMU; use write -z")
        data = op.data()
        data_file = self._data_file(op, data)
        try:
            cmd = qemu_io_command(op, data_file)
            if self.domain.is_active():
                self.domain.monitor_qemu_io(self.qdev(), op, cmd)
            else:
                out = run(["qemu-io", "-f", self.spec.fmt, "-c", cmd, str(self.image)]).stdout
                check_qemu_io_output(op, cmd, out)
            self._write_shadow(op, data)
        finally:
            if data_file is not None:
                data_file.unlink(missing_ok=True)

    def _data_file(self, op: Op, data: bytes) -> Path | None:
        """The bytes of a data op in a file qemu-io (also QEMU's, via the monitor) can read."""
        if op.kind != "data":
            return None
        self._counter += 1
        data_file = self.domain.dir / f"data-{self.target}-{self._counter}.bin"
        data_file.write_bytes(data)
        data_file.chmod(0o644)
        return data_file

    def _write_shadow(self, op: Op, data: bytes) -> None:
        # the shadow only has to hold the bytes the disk reads back (zero and discard read as
        # zeros): a plain write, no qemu-io process per operation
        with self.shadow.open("r+b") as f:
            f.seek(op.offset)
            f.write(data)

    def apply_all(self, ops: Sequence[Op]) -> None:
        if len(ops) > 1 and not self.domain.is_active():
            self._apply_offline(ops)
            return
        for op in ops:
            self.apply(op)

    def _apply_offline(self, ops: Sequence[Op]) -> None:
        """All ``ops`` on the shut-off disk's image in one qemu-io run, each one's completion line checked."""
        for op in ops:
            if op.offset < 0 or op.end > self.size:
                raise ValueError(f"{op} outside disk {self.target} of {self.size} bytes")
        datas = [op.data() for op in ops]
        files = [self._data_file(op, data) for op, data in zip(ops, datas, strict=True)]
        try:
            argv = ["qemu-io", "-f", self.spec.fmt]
            for op, data_file in zip(ops, files, strict=True):
                argv += ["-c", qemu_io_command(op, data_file)]
            out = run([*argv, str(self.image)]).stdout
            lines = Counter(line.strip() for line in out.splitlines())
            wanted = Counter(done_line(op) for op in ops)
            if "failed" in out or any(lines[line] < n for line, n in wanted.items()):
                raise LabError(f"qemu-io on {self.image} failed: {out.strip()!r}")
            for op, data in zip(ops, datas, strict=True):
                self._write_shadow(op, data)
        finally:
            for data_file in files:
                if data_file is not None:
                    data_file.unlink(missing_ok=True)

    def write_data(self, offset: int, length: int, seed: int = 0) -> Op:
        op = data_op(offset, length, seed)
        self.apply(op)
        return op

    def write_pattern(self, offset: int, length: int, pattern: int) -> Op:
        op = pattern_op(offset, length, pattern)
        self.apply(op)
        return op

    def write_zero(self, offset: int, length: int) -> Op:
        op = zero_op(offset, length)
        self.apply(op)
        return op

    def discard(self, offset: int, length: int) -> Op:
        op = discard_op(offset, length)
        self.apply(op)
        return op

    # ---- expected bytes
    def expected(self, offset: int = 0, length: int | None = None) -> bytes:
        length = self.size - offset if length is None else length
        with self.shadow.open("rb") as f:
            f.seek(offset)
            data = f.read(length)
        return data + bytes(length - len(data))

    def snapshot(self, name: str) -> Path:
        """Copy the shadow (sparse) as the expected image at a backup point."""
        dest = self.domain.dir / f"expect-{self.target}-{name}.raw"
        run(["cp", "--sparse=always", str(self.shadow), str(dest)])
        return dest

    def compare_shadow(self, image: Path | str, fmt: str | None = None) -> None:
        """Raise ImageMismatch unless ``image`` holds exactly the shadow's bytes."""
        compare_images(image, self.shadow, fmt=fmt)

    def flush(self) -> None:
        """Make QEMU write its caches (qcow2 metadata) to the image file."""
        if self.domain.is_active():
            out = self.domain.hmp(f'qemu-io -d {self.qdev()} "flush"')
            if out.strip():
                raise LabError(f"{self.domain.name}: flush {self.target}: {out.strip()}")

    def check_image(self) -> None:
        """The disk image itself (live or not) holds exactly the shadow's bytes."""
        self.flush()
        compare_images(self.image, self.shadow, fmt=self.spec.fmt)

    # ---- disk changes for chain tests
    def resize(self, new_size: int) -> None:
        """Grow (or shrink) the disk, live via blockResize or offline via qemu-img; the shadow follows."""
        import libvirt

        if self.domain.is_active():
            self.domain.dom.blockResize(self.target, new_size, libvirt.VIR_DOMAIN_BLOCK_RESIZE_BYTES)
        else:
            shrink = ["--shrink"] if new_size < self.size else []
            run(["qemu-img", "resize", "-q", "-f", self.spec.fmt, *shrink, str(self.image), str(new_size)])
        with self.shadow.open("r+b") as f:
            f.truncate(new_size)
        self.spec = dataclasses.replace(self.spec, size=new_size)

    def bitmaps(self) -> list[str]:
        """Persistent bitmap names in the qcow2 image (as stored on disk)."""
        return list(self.bitmap_flags())

    def bitmap_flags(self) -> dict[str, list[str]]:
        """Persistent bitmaps with their flags (``auto``; ``in-use`` = not stored cleanly, broken)."""
        import json

        info = json.loads(run(["qemu-img", "info", "-U", "--output=json", str(self.image)]).stdout)
        data = info.get("format-specific", {}).get("data", {})
        return {b["name"]: list(b.get("flags", [])) for b in data.get("bitmaps", [])}

    def remove_bitmap(self, name: str) -> None:
        """Delete a persistent bitmap from the image (domain must be off), as an admin might."""
        if self.domain.is_active():
            raise LabError(f"{self.domain.name}: stop the domain before removing bitmap {name}")
        run(["qemu-img", "bitmap", "--remove", str(self.image), name])


class LabDomain:
    """A throw-away domain; see :func:`make_domain`."""

    def __init__(self, conn: Any, name: str, lab_dir: Path, specs: Sequence[DiskSpec]) -> None:
        self.conn = conn
        self.name = name
        self.dir = lab_dir
        self.sock_dir = lab_dir / "sock"
        self.disks: dict[str, ShadowDisk] = {}
        for spec in specs:
            self._new_disk(spec)
        self.dom = conn.defineXML(domain_xml(name, [(d.spec, d.image) for d in self.disks.values()]))

    def _new_disk(self, spec: DiskSpec) -> ShadowDisk:
        if spec.target in self.disks:
            raise ValueError(f"{self.name} already has a disk {spec.target}")
        image = self.dir / f"{spec.target}.{spec.fmt}"
        shadow = self.dir / f"shadow-{spec.target}.raw"
        run(["qemu-img", "create", "-q", "-f", spec.fmt, str(image), str(spec.size)])
        image.chmod(0o644)
        with shadow.open("wb") as f:
            f.truncate(spec.size)
        shadow.chmod(0o644)
        disk = ShadowDisk(self, spec, image, shadow)
        self.disks[spec.target] = disk
        return disk

    def attach_disk(self, spec: DiskSpec) -> ShadowDisk:
        """Add a new empty disk (hot-plugged when running; SATA cannot hot-plug: use scsi or virtio)."""
        import libvirt

        disk = self._new_disk(spec)
        flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG | (libvirt.VIR_DOMAIN_AFFECT_LIVE if self.is_active() else 0)
        try:
            self.dom.attachDeviceFlags(disk_xml(spec, disk.image), flags)
        except libvirt.libvirtError:
            del self.disks[spec.target]
            raise
        return disk

    def stop(self, wait: float = 60.0) -> None:
        """Power off cleanly: SIGTERM only, so QEMU stores persistent bitmaps (there is no OS to shut down).

        Plain destroy() escalates to SIGKILL after a few seconds, which on a
        loaded machine can leave qcow2 bitmaps marked in-use (broken).
        """
        import libvirt

        deadline = time.monotonic() + wait
        while self.dom.isActive():
            try:
                self.dom.destroyFlags(libvirt.VIR_DOMAIN_DESTROY_GRACEFUL)
            except libvirt.libvirtError as err:
                if not self.dom.isActive():
                    break
                if time.monotonic() > deadline:
                    log.warning("lab: %s ignores SIGTERM (%s); killing it", self.name, err)
                    self.dom.destroy()
                    break
                time.sleep(0.5)

    def redefine(self) -> None:
        """Undefine (dropping libvirt's checkpoint metadata, keeping images and bitmaps) and define again.

        What a user sees after moving a domain to another host or recreating it.
        """
        import libvirt

        xml = self.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        self.dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
        self.dom = self.conn.defineXML(xml)

    def reconnect(self) -> None:
        """Look the domain up again on a live connection (after libvirtd was restarted)."""
        self.dom = self.conn.live().lookupByName(self.name) if isinstance(self.conn, LiveConn) \
            else self.conn.lookupByName(self.name)

    def disk(self, target: str = "sda") -> ShadowDisk:
        return self.disks[target]

    def start(self) -> None:
        import libvirt

        if self.dom.isActive():
            return
        try:
            self.dom.create()
        except libvirt.libvirtError as err:
            # Seen on the shared 2-core lab under heavy parallel load: QEMU exits
            # silently at start ("process exited while connecting to monitor"),
            # at the same second another domain's QEMU dies. Starting is not what
            # the tests check, so one retry; a second failure is reported.
            log.warning("lab: %s did not start (%s), retrying once; log:\n%s", self.name, err, self.log_tail())
            time.sleep(1)
            try:
                self.dom.create()
            except libvirt.libvirtError as err2:
                raise LabError(f"{self.name}: start failed: {err2}; {self.log_path}:\n{self.log_tail()}") from err2

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError as err:
            return f"(no log: {err})"

    def is_active(self) -> bool:
        return bool(self.dom.isActive())

    def xml(self, flags: int = 0) -> str:
        return str(self.dom.XMLDesc(flags))

    def alias(self, target: str) -> str:
        from lxml import etree

        root = etree.fromstring(self.xml().encode())
        alias = list(root.xpath(f"devices/disk[target/@dev='{target}']/alias/@name"))  # type: ignore[arg-type]
        if not alias:
            raise LabError(f"{self.name}: disk {target} has no alias (domain not running?)")
        return str(alias[0])

    def hmp(self, command: str) -> str:
        import libvirt_qemu

        return str(
            libvirt_qemu.qemuMonitorCommand(self.dom, command, libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
        )

    @property
    def log_path(self) -> Path:
        return QEMU_LOG_DIR / f"{self.name}.log"

    def monitor_qemu_io(self, qdev: str, op: Op, cmd: str, wait: float = 10.0) -> None:
        """Run qemu-io on the running domain's device and confirm it worked.

        HMP qemu-io prints its result (also "write failed: ...") on QEMU's
        stdout, i.e. the domain log, not the monitor: so look for the
        completion line there. Anything on the monitor itself is an error.
        """
        log_path = self.log_path
        start = log_path.stat().st_size if log_path.exists() else 0
        out = self.hmp(f'qemu-io -d {qdev} "{cmd}"')
        if out.strip():
            raise LabError(f"{self.name}: qemu-io -d {qdev} {cmd!r}: {out.strip()}")
        want = done_line(op)
        deadline = time.monotonic() + wait
        while True:
            with contextlib.suppress(FileNotFoundError), log_path.open("rb") as f:
                size = os.fstat(f.fileno()).st_size
                f.seek(start if size >= start else 0)  # virtlogd rotated the log
                new = f.read().decode(errors="replace")
                if "failed" in new:
                    raise LabError(f"{self.name}: qemu-io {cmd!r}: {new.strip()}")
                if want in new:
                    return
            if time.monotonic() > deadline:
                raise LabError(f"{self.name}: qemu-io {cmd!r}: no {want!r} in {log_path}")
            time.sleep(0.01)

    def socket_path(self, name: str = "backup") -> Path:
        return self.sock_dir / f"{name}.sock"

    def job_active(self) -> bool:
        import libvirt

        return bool(self.dom.isActive()) and self.dom.jobInfo()[0] != libvirt.VIR_DOMAIN_JOB_NONE

    def abort_job(self) -> None:
        import libvirt

        try:
            if self.dom.isActive() and self.dom.jobInfo()[0] != libvirt.VIR_DOMAIN_JOB_NONE:
                self.dom.abortJob()
        except libvirt.libvirtError as err:
            log.debug("abortJob on %s: %s", self.name, err)

    def remove(self) -> None:
        """Abort any job, destroy, undefine with checkpoint metadata, delete images."""
        import libvirt

        with contextlib.suppress(libvirt.libvirtError):
            self.reconnect()
        self.abort_job()
        with contextlib.suppress(libvirt.libvirtError):
            if self.dom.isActive():
                self.dom.destroy()
        flags = (
            libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
            | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
            | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
        )
        with contextlib.suppress(libvirt.libvirtError):
            self.dom.undefineFlags(flags)
        shutil.rmtree(self.dir, ignore_errors=True)
        self.log_path.unlink(missing_ok=True)


BUSES = ("sata", "virtio", "scsi")


def owner_tag() -> str:
    """Who made a domain: this process and its start time (pids get reused)."""
    return f"{OWNER_PREFIX}{os.getpid()}:{_start_time(os.getpid())}"


def _start_time(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "gone"


def owner_alive(tag: str) -> bool:
    pid, _, start = tag.removeprefix(OWNER_PREFIX).partition(":")
    return pid.isdigit() and _start_time(int(pid)) == start


def sweep_orphans(conn: Any) -> list[str]:
    """Remove lab domains whose making process died (a killed pytest); others' are left alone."""
    import libvirt

    removed = []
    for dom in conn.listAllDomains():
        name = dom.name()
        if not name.startswith(NAME_PREFIX):
            continue
        try:
            desc = dom.metadata(libvirt.VIR_DOMAIN_METADATA_DESCRIPTION, None)
        except libvirt.libvirtError:
            continue  # not made by this lab (no description)
        if not desc.startswith(OWNER_PREFIX) or owner_alive(desc):
            continue
        source = re.search(r"<source file='([^']+)'", dom.XMLDesc(0))
        lab_dir = Path(source.group(1)).parent if source else None
        orphan = LabDomain.__new__(LabDomain)
        orphan.conn, orphan.dom, orphan.name = conn, dom, name
        orphan.dir = lab_dir if lab_dir and lab_dir.parent == LAB_ROOT else Path("/nonexistent")
        orphan.remove()
        removed.append(name)
        log.warning("lab: removed orphaned domain %s (%s)", name, desc)
    return removed


def disk_xml(spec: DiskSpec, image: Path) -> str:
    if spec.bus not in BUSES:
        raise ValueError(f"unsupported bus {spec.bus!r}")
    return f"""    <disk type='file' device='disk'>
      <driver name='qemu' type='{spec.fmt}' discard='unmap'/>
      <source file='{image}'/>
      <target dev='{spec.target}' bus='{spec.bus}'/>
    </disk>"""


def domain_xml(name: str, disks: Sequence[tuple[DiskSpec, Path]]) -> str:
    """Minimal q35 TCG domain: no OS, no graphics, no network, no balloon.

    A virtio-scsi controller and two spare PCIe root ports are always there,
    so scsi and virtio disks can be hot-plugged.
    """
    disks_xml = "\n".join(disk_xml(spec, image) for spec, image in disks)
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <description>{owner_tag()}</description>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type></os>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{EMULATOR}</emulator>
{disks_xml}
    <controller type='scsi' model='virtio-scsi'/>
    <controller type='pci' index='0' model='pcie-root'/>
    <controller type='pci' model='pcie-root-port'/>
    <controller type='pci' model='pcie-root-port'/>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>"""


# --------------------------------------------------------------------------
# pytest fixtures


def _require_lab() -> None:
    require(
        "libvirt/QEMU lab",
        ("libvirtd", "virtlogd", "virsh", "qemu-system-x86_64", "qemu-img", "qemu-io"),
        ("libvirt", "libvirt_qemu"),
        root=True,
    )


@pytest.fixture(scope="session")
def libvirt_daemons() -> Iterator[LabDaemons]:
    _require_lab()
    daemons = LabDaemons()
    try:
        daemons.ensure()
    except LabError as exc:
        daemons.release()
        pytest.fail(f"lab daemons: {exc}", pytrace=False)
    try:
        yield daemons
    finally:
        daemons.release()


@pytest.fixture(scope="session")
def libvirt_conn(libvirt_daemons: LabDaemons) -> Iterator[Any]:
    import libvirt

    conn = LiveConn()
    sweep_orphans(conn)
    try:
        yield conn
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            conn.live().close()


MakeDomain = Callable[..., LabDomain]


@pytest.fixture
def make_domain(libvirt_conn: Any) -> Iterator[MakeDomain]:
    """Factory: ``make_domain(disks=[DiskSpec(...)], start=True) -> LabDomain``."""
    made: list[LabDomain] = []

    def factory(disks: Sequence[DiskSpec] = (DiskSpec(),), start: bool = True) -> LabDomain:
        if not 1 <= len(disks) <= 16:
            raise ValueError("a lab domain has 1-16 disks")
        if not libvirt_conn.isAlive():
            pytest.fail(f"connection to libvirtd lost (did it crash? see {DAEMON_LOG_DIR}/libvirtd.log, dmesg)")
        name = f"{NAME_PREFIX}{uuid.uuid4().hex[:8]}"
        lab_dir = make_lab_dir(prefix=f"{name}-")
        try:
            domain = LabDomain(libvirt_conn, name, lab_dir, disks)
        except Exception:
            shutil.rmtree(lab_dir, ignore_errors=True)
            raise
        made.append(domain)
        if start:
            domain.start()
        return domain

    try:
        yield factory
    finally:
        for domain in reversed(made):
            domain.remove()


__all__ = [  # re-exported for existing imports: new code may import from common/diskops/images
    "ALIGN",
    "JOB_SAFE_KINDS",
    "KiB",
    "MiB",
    "DiskSpec",
    "ImageMismatch",
    "LabDaemons",
    "LabDomain",
    "LabError",
    "Op",
    "ShadowDisk",
    "assert_bytes_equal",
    "check_qemu_io_output",
    "compare_images",
    "data_op",
    "describe_bytes_mismatch",
    "describe_mismatch",
    "discard_op",
    "image_format",
    "libvirt_conn",
    "libvirt_daemons",
    "make_domain",
    "make_lab_dir",
    "pids_of",
    "restart_libvirtd",
    "pattern_op",
    "qemu_io_command",
    "random_writes",
    "ranges_cover",
    "ranges_of",
    "require",
    "run",
    "sweep_orphans",
    "virtual_size",
    "zero_op",
]
