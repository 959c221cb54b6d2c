"""A tiny bootable Linux guest with a real qemu-guest-agent, for freeze/thaw tests.

Built on demand from host packages, nothing installed on the host:

* kernel: Debian's ``linux-image-cloud-amd64`` (its current ``linux-image-*``
  dependency) fetched with ``apt-get download`` and unpacked with ``dpkg -x``;
* initramfs (written here as a gzip'd newc cpio): ``busybox-static`` as /init
  and shell, ``qemu-ga`` plus the libraries ``ldd`` lists, the virtio modules
  (virtio_pci, virtio_blk, virtio_console and what they depend on, read from
  each module's .modinfo) in dependency order.

The guest mounts its ext4 data disk (``vda``, formatted on the host) at
``/mnt/data`` and runs ``qemu-ga`` on ``/dev/virtio-ports/org.qemu.guest_agent.0``
(links made from ``/sys/class/virtio-ports/*/name``: there is no udev).
The build is cached in ``/var/tmp/virtnbd-guest-<hash>`` (hash of the package
versions and of this builder) and rebuilt when missing.

Domains are ``<domain type='qemu'>`` (never kvm: it hangs here), direct kernel
boot, 128 MiB RAM, virtio disk with cache='writeback', a unix agent channel.
Tests talk to the guest through the agent (``guest-exec``), see :class:`Guest`.

Fixtures: ``guest_build`` (session) and ``make_guest`` (function; at most two
guests at once, every guest destroyed and undefined at test end).
"""
from __future__ import annotations

import base64
import contextlib
import fcntl
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import stat
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.lab.libvirt_lab import EMULATOR, NAME_PREFIX, LabError, make_lab_dir, run

MiB = 1024 * 1024
KERNEL_META = "linux-image-cloud-amd64"
GUEST_PACKAGES = ("busybox-static", "qemu-guest-agent")
AGENT_CHANNEL = "org.qemu.guest_agent.0"
MODULES = ("virtio_pci", "virtio_blk", "virtio_console")
CACHE_ROOT = Path(os.environ.get("VNBD_GUEST_CACHE", "/var/tmp"))
BUILDER_VERSION = "1"
MAX_GUESTS = 2
DATA_MOUNT = "/mnt/data"
GUEST_HOSTNAME = "vnbd-guest"

INIT_SCRIPT = r"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp /run /var/run /mnt/data /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
hostname @HOSTNAME@
for m in @MODULES@; do
  insmod /lib/modules/$m.ko || echo "vnbd-guest: insmod $m failed"
done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
if mount -t ext4 /dev/vda /mnt/data; then echo "vnbd-guest: data disk mounted"; else echo "vnbd-guest: no data disk"; fi
mkdir -p /dev/virtio-ports
i=0
while [ $i -lt 30 ]; do
  for p in /sys/class/virtio-ports/*; do
    [ -r "$p/name" ] && [ -n "$(cat $p/name)" ] && ln -sf "/dev/${p##*/}" "/dev/virtio-ports/$(cat $p/name)"
  done
  [ -e /dev/virtio-ports/@CHANNEL@ ] && break
  sleep 0.1; i=$((i+1))
done
if [ -e /dev/virtio-ports/@CHANNEL@ ]; then
  echo "vnbd-guest: starting qemu-ga"
  /usr/sbin/qemu-ga -m virtio-serial -p /dev/virtio-ports/@CHANNEL@ -t /run &
else
  echo "vnbd-guest: no agent channel"
fi
echo "vnbd-guest: ready"
while :; do sleep 3600; done
"""

OS_RELEASE = """PRETTY_NAME="virtnbd test guest"
NAME="virtnbd-guest"
ID=vnbdguest
VERSION_ID="1"
"""


# --------------------------------------------------------------------------
# build


@dataclass(frozen=True)
class GuestBuild:
    kernel: Path
    initrd: Path
    key: str
    kernel_package: str


def _pkg_version(name: str) -> str:
    return run(["dpkg-query", "-W", "-f", "${Version}", name]).stdout.strip()


def kernel_package() -> tuple[str, str]:
    """(package, candidate version) of the kernel image the metapackage depends on."""
    out = run(["apt-cache", "depends", KERNEL_META]).stdout
    match = re.search(r"Depends:\s*(linux-image-\S+)", out)
    if not match:
        raise LabError(f"apt-cache depends {KERNEL_META}: no linux-image dependency in {out!r}")
    pkg = match.group(1)
    policy = run(["apt-cache", "policy", pkg]).stdout
    cand = re.search(r"Candidate:\s*(\S+)", policy)
    if not cand or cand.group(1) == "(none)":
        raise LabError(f"{pkg}: no candidate version (apt-get update?)")
    return pkg, cand.group(1)


def build_key(pkg: str, version: str) -> str:
    h = hashlib.sha256()
    for part in (BUILDER_VERSION, pkg, version, INIT_SCRIPT, OS_RELEASE, *MODULES,
                 *(f"{p}={_pkg_version(p)}" for p in GUEST_PACKAGES)):
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:12]


def _modinfo_depends(ko: Path) -> list[str]:
    data = ko.read_bytes()
    match = re.search(rb"\0depends=([^\0]*)\0", data)
    if not match or not match.group(1):
        return []
    return [d.decode().replace("-", "_") for d in match.group(1).split(b",") if d]


def module_order(modroot: Path, wanted: Sequence[str]) -> list[Path]:
    """The .ko files for ``wanted`` and their dependencies, dependencies first."""
    by_name = {p.name.removesuffix(".ko").replace("-", "_"): p for p in modroot.rglob("*.ko")}
    order: list[Path] = []
    seen: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in seen:
            return
        if name in path:
            raise LabError(f"module dependency cycle: {' -> '.join((*path, name))}")
        if name not in by_name:
            raise LabError(f"module {name} not found under {modroot} (built in?)")
        for dep in _modinfo_depends(by_name[name]):
            visit(dep, (*path, name))
        seen.add(name)
        order.append(by_name[name])

    for name in wanted:
        visit(name, ())
    return order


def _ldd_libs(binary: str) -> list[str]:
    libs = []
    for line in run(["ldd", binary]).stdout.splitlines():
        match = re.search(r"(/\S+)\s+\(0x", line)
        if match:
            libs.append(match.group(1))
    return libs


class Cpio:
    """A gzip'd newc cpio archive built in memory (the kernel's initramfs format)."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1
        self.dirs: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"") -> None:
        fields = [self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0]
        self.ino += 1
        header = b"070701" + b"".join(f"{v:08x}".encode() for v in fields)
        self.buf.write(header + name.encode() + b"\0")
        self.buf.write(b"\0" * (-self.buf.tell() % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-self.buf.tell() % 4))

    def mkdir(self, name: str) -> None:
        name = name.strip("/")
        parts = name.split("/")
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d and d not in self.dirs:
                self.dirs.add(d)
                self._entry(d, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o755) -> None:
        name = name.strip("/")
        self.mkdir(os.path.dirname(name))
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        name = name.strip("/")
        self.mkdir(os.path.dirname(name))
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return gzip.compress(self.buf.getvalue(), compresslevel=6, mtime=0)


def build_initramfs(modules: Sequence[Path]) -> bytes:
    cpio = Cpio()
    for d in ("proc", "sys", "dev", "tmp", "run", "var/run", "mnt/data", "etc", "root", "lib/modules"):
        cpio.mkdir(d)
    script = (INIT_SCRIPT.replace("@MODULES@", " ".join(p.name.removesuffix(".ko") for p in modules))
              .replace("@CHANNEL@", AGENT_CHANNEL).replace("@HOSTNAME@", GUEST_HOSTNAME))
    cpio.file("init", script.encode())
    busybox = shutil.which("busybox") or "/bin/busybox"
    cpio.file("bin/busybox", Path(busybox).read_bytes())
    cpio.symlink("bin/sh", "busybox")
    qemu_ga = shutil.which("qemu-ga") or "/usr/sbin/qemu-ga"
    cpio.file("usr/sbin/qemu-ga", Path(qemu_ga).read_bytes())
    for lib in _ldd_libs(qemu_ga):
        cpio.file(lib, Path(os.path.realpath(lib)).read_bytes())
    for ko in modules:
        cpio.file(f"lib/modules/{ko.name}", ko.read_bytes(), 0o644)
    cpio.file("etc/os-release", OS_RELEASE.encode(), 0o644)
    cpio.file("etc/hostname", f"{GUEST_HOSTNAME}\n".encode(), 0o644)
    cpio.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n", 0o644)
    return cpio.finish()


def _build_into(dest: Path, pkg: str) -> None:
    work = Path(tempfile.mkdtemp(prefix="build-", dir=dest.parent))
    try:
        proc = subprocess.run(["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", pkg], cwd=work,
                              capture_output=True, text=True, timeout=600, check=False)
        if proc.returncode != 0:
            raise LabError(f"apt-get download {pkg} -> exit {proc.returncode}: {proc.stderr.strip()}")
        debs = list(work.glob("*.deb"))
        if len(debs) != 1:
            raise LabError(f"apt-get download {pkg}: expected one .deb, got {debs}")
        root = work / "root"
        run(["dpkg", "-x", str(debs[0]), str(root)], timeout=300)
        vmlinuz = sorted((root / "boot").glob("vmlinuz-*"))
        if not vmlinuz:
            raise LabError(f"{pkg}: no /boot/vmlinuz-* in the package")
        modroots = sorted((root / "lib" / "modules").glob("*")) or sorted((root / "usr" / "lib" / "modules").glob("*"))
        if not modroots:
            raise LabError(f"{pkg}: no lib/modules in the package")
        initrd = build_initramfs(module_order(modroots[0], MODULES))
        stage = Path(tempfile.mkdtemp(prefix="stage-", dir=dest.parent))
        shutil.copyfile(vmlinuz[0], stage / "vmlinuz")
        (stage / "initrd.gz").write_bytes(initrd)
        (stage / "package").write_text(f"{pkg}\n")
        for f in stage.iterdir():
            f.chmod(0o644)
        stage.chmod(0o755)
        stage.rename(dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def build_guest(cache_root: Path = CACHE_ROOT) -> GuestBuild:
    """Kernel + initramfs of the test guest, from the cache or built now (about 5 s)."""
    pkg, version = kernel_package()
    key = build_key(pkg, version)
    dest = cache_root / f"virtnbd-guest-{key}"
    if not (dest / "initrd.gz").exists():
        lock_path = cache_root / f"virtnbd-guest-{key}.lock"
        with lock_path.open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (dest / "initrd.gz").exists():
                shutil.rmtree(dest, ignore_errors=True)
                _build_into(dest, pkg)
    return GuestBuild(kernel=dest / "vmlinuz", initrd=dest / "initrd.gz", key=key, kernel_package=pkg)


# --------------------------------------------------------------------------
# data disk


def make_data_disk(path: Path, size: int = 32 * MiB, fmt: str = "qcow2",
                   files: Mapping[str, bytes] | None = None) -> Path:
    """An ext4 filesystem image (fully initialised, so nothing is written lazily later).

    ``files`` (name -> contents) are put into its root directory (``mkfs.ext4 -d``).
    """
    raw = path.with_suffix(".mkfs.raw")
    with raw.open("wb") as f:
        f.truncate(size)
    populate = path.with_suffix(".mkfs.d")
    try:
        extra: list[str] = []
        if files:
            populate.mkdir()
            for name, data in files.items():
                (populate / name).write_bytes(data)
            extra = ["-d", str(populate)]
        run(["mkfs.ext4", "-q", "-F", "-L", "vnbddata", "-E", "lazy_itable_init=0,lazy_journal_init=0", *extra,
             str(raw)])
        if fmt == "raw":
            raw.rename(path)
        else:
            run(["qemu-img", "convert", "-q", "-f", "raw", "-O", fmt, str(raw), str(path)])
    finally:
        raw.unlink(missing_ok=True)
        shutil.rmtree(populate, ignore_errors=True)
    path.chmod(0o644)
    return path


def debugfs_cat(image: Path | str, path: str) -> bytes | None:
    """Contents of ``path`` in the ext4 raw image, None when the file does not exist."""
    proc = subprocess.run(["debugfs", "-R", f"cat {path}", str(image)], capture_output=True, timeout=60, check=False)
    err = proc.stderr.decode(errors="replace")
    if "File not found" in err:
        return None
    if proc.returncode != 0:
        raise LabError(f"debugfs cat {path} {image}: {err.strip()}")
    return proc.stdout


def recovered_copy(image: Path, dest: Path) -> Path:
    """A copy of the ext4 image with its journal replayed (``e2fsck -fy``): what a mount would see."""
    shutil.copyfile(image, dest)
    proc = subprocess.run(["e2fsck", "-fy", str(dest)], capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode > 1:   # 0: clean, 1: fixed (journal replayed)
        raise LabError(f"e2fsck -fy {dest} -> {proc.returncode}: {proc.stdout}{proc.stderr}")
    return dest


def e2fsck_clean(image: Path | str) -> tuple[bool, str]:
    """(clean, output) of a read-only forced check ``e2fsck -fn``."""
    proc = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True, timeout=120, check=False)
    return proc.returncode == 0, proc.stdout + proc.stderr


# --------------------------------------------------------------------------
# domains


def guest_xml(name: str, build: GuestBuild, disk: Path, console: Path, *, agent_channel: bool = True,
              disk_fmt: str = "qcow2", memory_mib: int = 128, nic: bool = False) -> str:
    """``nic``: a user-mode network card (the guest has no driver for it: it is there for its MAC).
    No UEFI: OVMF with direct kernel boot printed nothing within 150 s under TCG here."""
    channel = (f"""    <channel type='unix'>
      <target type='virtio' name='{AGENT_CHANNEL}'/>
    </channel>
""" if agent_channel else "")
    if nic:
        channel += """    <interface type='user'>
      <model type='e1000e'/>
    </interface>
"""
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{build.kernel}</kernel>
    <initrd>{build.initrd}</initrd>
    <cmdline>console=ttyS0 panic=-1 quiet</cmdline>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{EMULATOR}</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='{disk_fmt}' cache='writeback' discard='unmap'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
{channel}    <serial type='file'>
      <source path='{console}'/>
      <target port='0'/>
    </serial>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>"""


@dataclass(frozen=True)
class ExecResult:
    exitcode: int
    stdout: bytes
    stderr: bytes


class Guest:
    """A booted test guest; commands go through its agent (``guest-exec``)."""

    def __init__(self, conn: Any, build: GuestBuild, agent_channel: bool = True, disk_size: int = 32 * MiB,
                 files: Mapping[str, bytes] | None = None, *, nic: bool = False) -> None:
        self.conn = conn
        self.name = f"{NAME_PREFIX}g{uuid.uuid4().hex[:8]}"
        self.dir = make_lab_dir(prefix=f"{self.name}-")
        self.disk = make_data_disk(self.dir / "vda.qcow2", disk_size, files=files)
        self.console = self.dir / "console.log"
        self.agent_channel = agent_channel
        self.dom = conn.defineXML(guest_xml(self.name, build, self.disk, self.console, agent_channel=agent_channel,
                                            nic=nic))

    @classmethod
    def attach(cls, conn: Any, name: str) -> Guest:
        """A running guest made earlier (scripts/lab/guest start), for agent commands only."""
        guest = cls.__new__(cls)
        guest.conn, guest.name, guest.dom = conn, name, conn.lookupByName(name)
        guest.agent_channel = True
        return guest

    # ---- life cycle
    def start(self, wait_agent: bool = True, timeout: float = 90.0) -> None:
        self.dom.create()
        if wait_agent and self.agent_channel:
            self.wait_agent(timeout)
        elif not self.agent_channel:
            self.wait_console("vnbd-guest: ready", timeout)

    def console_text(self) -> str:
        with contextlib.suppress(FileNotFoundError):
            return self.console.read_text(errors="replace")
        return ""

    def wait_console(self, text: str, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.console_text():
            if not self.dom.isActive():
                raise LabError(f"{self.name} stopped while booting; console:\n{self.console_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise LabError(f"{self.name}: no {text!r} on the console after {timeout:.0f}s:\n"
                               f"{self.console_text()[-3000:]}")
            time.sleep(0.2)

    def wait_agent(self, timeout: float = 90.0) -> float:
        """Seconds until ``guest-ping`` answered."""
        t0 = time.monotonic()
        self.wait_console("vnbd-guest: starting qemu-ga", timeout)
        while True:
            try:
                self.agent("guest-ping", timeout=5)
                return time.monotonic() - t0
            except LabError:
                if time.monotonic() - t0 > timeout:
                    raise
                time.sleep(0.3)

    def wait_answer(self, timeout: float = 120.0) -> None:
        """Until ``guest-ping`` answers (no console needed: works on attached guests too)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.agent("guest-ping", timeout=5)
                return
            except LabError:
                if time.monotonic() > deadline or not self.dom.isActive():
                    raise
                time.sleep(0.2)

    def remove(self, attempts: int = 5) -> None:
        """Destroy, undefine (with checkpoint metadata), delete the files; LabError when the domain stays."""
        import libvirt

        last = ""
        for _ in range(attempts):
            try:
                if self.dom.isActive():
                    self.dom.destroy()
                self.dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
                                       | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)
                break
            except libvirt.libvirtError as err:
                if err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    break
                last = str(err.get_error_message())
                time.sleep(1.0)
        else:
            raise LabError(f"{self.name}: cannot destroy/undefine: {last}")
        shutil.rmtree(self.dir, ignore_errors=True)

    # ---- agent
    def agent(self, command: str, arguments: dict[str, Any] | None = None, timeout: int = 10) -> Any:
        """Send one agent command (libvirt_qemu.qemuAgentCommand); its ``return`` value."""
        import libvirt
        import libvirt_qemu

        msg: dict[str, Any] = {"execute": command}
        if arguments is not None:
            msg["arguments"] = arguments
        try:
            out = libvirt_qemu.qemuAgentCommand(self.dom, json.dumps(msg), timeout, 0)
        except libvirt.libvirtError as err:
            raise LabError(f"{self.name}: agent {command}: {err.get_error_message()}") from err
        return json.loads(out).get("return")

    def fsfreeze_status(self) -> str:
        return str(self.agent("guest-fsfreeze-status"))

    def exec(self, argv: Sequence[str], timeout: float = 30.0) -> ExecResult:
        """Run a program in the guest and wait for it (``guest-exec`` + ``guest-exec-status``)."""
        pid = self.agent("guest-exec", {"path": argv[0], "arg": list(argv[1:]), "capture-output": True})["pid"]
        deadline = time.monotonic() + timeout
        while True:
            status = self.agent("guest-exec-status", {"pid": pid})
            if status.get("exited"):
                return ExecResult(
                    exitcode=int(status.get("exitcode", -1)),
                    stdout=base64.b64decode(status.get("out-data", "")),
                    stderr=base64.b64decode(status.get("err-data", "")),
                )
            if time.monotonic() > deadline:
                raise LabError(f"{self.name}: {argv} still running after {timeout:.0f}s")
            time.sleep(0.05)

    def sh(self, script: str, timeout: float = 30.0) -> str:
        """Run ``sh -c script``; its stdout; LabError when it fails."""
        res = self.exec(["/bin/sh", "-c", script], timeout)
        if res.exitcode != 0:
            raise LabError(f"{self.name}: sh -c {script!r} -> {res.exitcode}: {res.stderr.decode(errors='replace')}")
        return res.stdout.decode(errors="replace")

    def write_file(self, path: str, text: str) -> None:
        """Write a file in the guest WITHOUT sync: it sits in the guest's page cache."""
        if "'" in text or "'" in path:
            raise ValueError("no single quotes, please")
        self.sh(f"printf '%s' '{text}' > '{path}'")

    def sync(self) -> None:
        self.sh("sync")

    def stop_agent(self, how: str = "KILL") -> None:
        """Kill (``KILL``: channel disconnects) or stop (``STOP``: hangs) qemu-ga in the guest."""
        self.agent("guest-exec", {"path": "/bin/sh", "arg": ["-c", f"sleep 0.3; kill -{how} $(pidof qemu-ga)"]})
        time.sleep(1.0)

    def channel_state(self) -> str | None:
        from lxml import etree

        root = etree.fromstring(self.dom.XMLDesc(0).encode())
        states = root.xpath(f"devices/channel/target[@name='{AGENT_CHANNEL}']/@state")
        return str(states[0]) if states else None


# --------------------------------------------------------------------------
# pytest fixtures


def _require_guest_tools() -> None:
    missing = [b for b in ("apt-get", "apt-cache", "dpkg", "dpkg-query", "ldd", "mkfs.ext4", "debugfs", "e2fsck")
               if not shutil.which(b)]
    missing += [b for b in ("busybox", "qemu-ga") if not shutil.which(b) and not Path(f"/usr/sbin/{b}").exists()]
    if missing:
        pytest.skip(f"test guest cannot be built: missing {', '.join(missing)}")


@pytest.fixture(scope="session")
def guest_build(libvirt_daemons: Any) -> GuestBuild:
    _require_guest_tools()
    return build_guest()


@pytest.fixture(scope="module")
def module_guest(libvirt_conn: Any, guest_build: GuestBuild) -> Iterator[Guest]:
    """One booted guest shared by a test module (tests that leave its agent running)."""
    guest = Guest(libvirt_conn, guest_build)
    try:
        guest.start()
        yield guest
    finally:
        guest.remove()


MakeGuest = Callable[..., Guest]


@pytest.fixture
def make_guest(libvirt_conn: Any, guest_build: GuestBuild) -> Iterator[MakeGuest]:
    """Factory: ``make_guest(agent_channel=True, start=True, disk_size=32 MiB, files=None) -> Guest``.

    At most two guests per test (two cores).
    """
    made: list[Guest] = []

    def factory(agent_channel: bool = True, start: bool = True, disk_size: int = 32 * MiB,
                files: Mapping[str, bytes] | None = None, nic: bool = False) -> Guest:
        if len(made) >= MAX_GUESTS:
            raise LabError(f"at most {MAX_GUESTS} guests at a time on this lab")
        guest = Guest(libvirt_conn, guest_build, agent_channel=agent_channel, disk_size=disk_size, files=files,
                      nic=nic)
        made.append(guest)
        if start:
            guest.start()
        return guest

    try:
        yield factory
    finally:
        for guest in reversed(made):
            guest.remove()


__all__ = [
    "AGENT_CHANNEL",
    "DATA_MOUNT",
    "GUEST_HOSTNAME",
    "ExecResult",
    "Guest",
    "GuestBuild",
    "build_guest",
    "debugfs_cat",
    "e2fsck_clean",
    "guest_build",
    "make_data_disk",
    "make_guest",
    "module_guest",
    "recovered_copy",
]


# --------------------------------------------------------------------------
# for humans: scripts/lab/guest build | start [--no-agent] | exec NAME CMD | remove NAME


def _cli(argv: Sequence[str]) -> int:
    import argparse

    import libvirt

    from tests.lab.libvirt_lab import LAB_ROOT, URI

    p = argparse.ArgumentParser(prog="scripts/lab/guest", description="the virtnbd test guest, by hand")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("build", help="build (or find cached) kernel + initramfs; print their paths")
    start = sub.add_parser("start", help="boot a guest and leave it running; print its name")
    start.add_argument("--no-agent", action="store_true", help="no guest agent channel")
    ex = sub.add_parser("exec", help="run a shell command in the guest through the agent")
    ex.add_argument("name")
    ex.add_argument("script")
    rm = sub.add_parser("remove", help="destroy and undefine a guest, delete its files")
    rm.add_argument("name")
    args = p.parse_args(argv)
    build = build_guest()
    if args.cmd == "build":
        print(f"kernel {build.kernel}\ninitrd {build.initrd}\npackage {build.kernel_package}")
        return 0
    conn = libvirt.open(URI)
    try:
        if args.cmd == "start":
            guest = Guest(conn, build, agent_channel=not args.no_agent)
            t0 = time.monotonic()
            guest.start()
            print(f"{guest.name} running ({time.monotonic() - t0:.1f}s to agent), files in {guest.dir}")
            print(f"remove with: scripts/lab/guest remove {guest.name}")
            return 0
        if args.cmd == "exec":
            print(Guest.attach(conn, args.name).sh(args.script), end="")
            return 0
        dom = conn.lookupByName(args.name)
        with contextlib.suppress(libvirt.libvirtError):
            dom.destroy()
        dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
                          | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)
        for d in LAB_ROOT.glob(f"{args.name}-*"):
            shutil.rmtree(d, ignore_errors=True)
        print(f"{args.name} removed")
        return 0
    finally:
        conn.close()


if __name__ == "__main__":
    import sys

    sys.exit(_cli(sys.argv[1:]))
