"""A throw-away single-node Ceph cluster for tests and benchmarks.

One ``ceph-mon``, one ``ceph-mgr`` and one ``ceph-osd`` with the in-memory
``memstore`` object store, all under one folder, bound to 127.0.0.1 on free
non-default ports, cephx on, pool ``rbd`` created (size 1) and initialised.
Every daemon writes a pid file into the folder; :func:`stop` ends exactly
those processes and nothing else.

Use it as the session fixture ``ceph_cluster`` (registered in
tests/conftest.py), as a context manager (:func:`running_cluster`), or from
the shell: ``scripts/lab/ceph start|stop|status DIR``.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

DAEMONS = ("ceph-mon", "ceph-mgr", "ceph-osd", "radosgw")   # radosgw: tests/lab/rgw_lab.py
DEFAULT_MEMSTORE_BYTES = 1 << 30
CLIENT_ID = "admin"
POOL = "rbd"
CLIENT_TIMEOUT = 20          # seconds: a client op that takes longer is an error, never a hang
START_TIMEOUT = 60


class CephLabError(RuntimeError):
    pass


@dataclass(frozen=True)
class CephCluster:
    """Where a running test cluster lives and how to talk to it."""

    folder: Path
    conf: Path
    keyring: Path
    client_id: str
    fsid: str
    mon_addr: str            # "127.0.0.1"
    mon_port_v1: int         # legacy protocol port (what libvirt's <host port=> speaks)
    mon_port_v2: int
    pool: str = POOL

    @property
    def key(self) -> str:
        """The client's cephx secret (base64), e.g. for a libvirt secret."""
        return read_key(self.keyring)

    def cli_args(self) -> list[str]:
        return ["-c", str(self.conf), "--id", self.client_id, "--keyring", str(self.keyring)]

    def ceph(self, *args: str, timeout: float = 60) -> str:
        return _run(["ceph", *self.cli_args(), "--connect-timeout", str(CLIENT_TIMEOUT), *args], timeout)

    def rbd(self, *args: str, timeout: float = 120) -> str:
        return _run(["rbd", *self.cli_args(), *args], timeout)

    def rbd_spec(self, image: str, pool: str | None = None) -> str:
        """``rbd:`` file name for qemu-img / qemu-io."""
        return (
            f"rbd:{pool or self.pool}/{image}:conf={self.conf}:id={self.client_id}:keyring={self.keyring}"
        )


def read_key(keyring: Path) -> str:
    for line in keyring.read_text().splitlines():
        name, sep, value = line.strip().partition("=")
        if sep and name.strip() == "key":
            return value.strip()
    raise CephLabError(f"{keyring}: no key")


def _run(cmd: list[str], timeout: float = 60) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as err:
        raise CephLabError(f"timed out after {timeout}s: {' '.join(cmd)}") from err
    if proc.returncode != 0:
        raise CephLabError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def available() -> bool:
    return all(shutil.which(tool) for tool in (*DAEMONS[:3], "ceph", "rbd", "monmaptool", "ceph-authtool"))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _config(folder: Path, fsid: str, v1: int, v2: int, *, memstore_bytes: int, port_min: int) -> str:
    return f"""[global]
fsid = {fsid}
mon host = [v2:127.0.0.1:{v2},v1:127.0.0.1:{v1}]
mon initial members = a
public addr = 127.0.0.1
cluster addr = 127.0.0.1
public network = 127.0.0.0/8
ms bind port min = {port_min}
ms bind port max = {port_min + 99}
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
auth allow insecure global id reclaim = false
mon warn on insecure global id reclaim allowed = false
run dir = {folder}/run
admin socket = {folder}/run/$name.asok
pid file = {folder}/run/$name.pid
log file = {folder}/log/$name.log
log to stderr = false
err to stderr = false
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
osd crush chooseleaf type = 0
paxos propose interval = 0.1
mon data avail warn = 2
mon data avail crit = 1
mgr initial modules =

[mon]
mon data = {folder}/mon/$cluster-$id
keyring = {folder}/mon/$cluster-$id/keyring

[mgr]
mgr data = {folder}/mgr/$cluster-$id
keyring = {folder}/mgr/$cluster-$id/keyring

[osd]
osd data = {folder}/osd/$cluster-$id
keyring = {folder}/osd/$cluster-$id/keyring
osd objectstore = memstore
memstore device bytes = {memstore_bytes}
osd memory target = 939524096
osd max object size = 134217728

[client]
keyring = {folder}/ceph.client.{CLIENT_ID}.keyring
rados osd op timeout = {CLIENT_TIMEOUT}
rados mon op timeout = {CLIENT_TIMEOUT}
client mount timeout = {CLIENT_TIMEOUT}
"""


def _daemon(conf: Path, binary: str, ident: str, *extra: str) -> None:
    """Start one daemon; it forks into the background and writes its pid file."""
    _run([binary, "-c", str(conf), "-i", ident, *extra], timeout=60)


def _wait_for(what: str, check, timeout: float = START_TIMEOUT) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except CephLabError as err:
            last = err
        time.sleep(0.2)
    raise CephLabError(f"{what} not ready after {timeout}s ({last})")


def start(folder: str | os.PathLike[str], memstore_bytes: int = DEFAULT_MEMSTORE_BYTES) -> CephCluster:
    """Create and start a cluster under ``folder`` (must be empty or absent)."""
    root = Path(folder).resolve()
    root.mkdir(parents=True, exist_ok=True)
    if any(root.iterdir()):
        raise CephLabError(f"{root}: not empty")
    for sub in ("run", "log", "mon/ceph-a", "mgr/ceph-x"):
        (root / sub).mkdir(parents=True)
    fsid = str(uuid.uuid4())
    v1, v2 = _free_port(), _free_port()
    conf = root / "ceph.conf"
    conf.write_text(_config(root, fsid, v1, v2, memstore_bytes=memstore_bytes, port_min=_free_port_range()))
    cluster = CephCluster(
        folder=root, conf=conf, keyring=root / f"ceph.client.{CLIENT_ID}.keyring", client_id=CLIENT_ID,
        fsid=fsid, mon_addr="127.0.0.1", mon_port_v1=v1, mon_port_v2=v2,
    )
    try:
        _bootstrap_mon(cluster)
        _bootstrap_mgr(cluster)
        _bootstrap_osd(cluster)
        _create_pool(cluster, POOL)
    except BaseException:
        stop(root)
        raise
    return cluster


def _free_port_range() -> int:
    """A base port for OSD/mgr messengers, away from Ceph's default 6800-7300."""
    base = _free_port()
    return base if base + 100 < 65535 else 20000


def _bootstrap_mon(c: CephCluster) -> None:
    mon_keyring = c.folder / "mon.keyring"
    _run(["ceph-authtool", "--create-keyring", str(mon_keyring), "--gen-key", "-n", "mon.", "--cap", "mon", "allow *"])
    _run([
        "ceph-authtool", "--create-keyring", str(c.keyring), "--gen-key", "-n", f"client.{c.client_id}",
        "--cap", "mon", "allow *", "--cap", "osd", "allow *", "--cap", "mgr", "allow *", "--cap", "mds", "allow *",
    ])
    _run(["ceph-authtool", str(mon_keyring), "--import-keyring", str(c.keyring)])
    monmap = c.folder / "monmap"
    _run([
        "monmaptool", "--create", "--fsid", c.fsid, "--addv", "a",
        f"[v2:127.0.0.1:{c.mon_port_v2},v1:127.0.0.1:{c.mon_port_v1}]", str(monmap),
    ])
    _run(["ceph-mon", "-c", str(c.conf), "--mkfs", "-i", "a", "--monmap", str(monmap), "--keyring", str(mon_keyring)])
    _daemon(c.conf, "ceph-mon", "a")
    _wait_for("ceph-mon", lambda: bool(c.ceph("mon", "stat", timeout=30)))


def _bootstrap_mgr(c: CephCluster) -> None:
    keyring = c.folder / "mgr/ceph-x/keyring"
    # devicehealth is always on; with monitoring off it never creates its pool
    c.ceph("config", "set", "mgr", "mgr/devicehealth/enable_monitoring", "false", "--force")
    c.ceph("auth", "get-or-create", "mgr.x", "mon", "allow profile mgr", "osd", "allow *", "mds", "allow *",
           "-o", str(keyring))
    _daemon(c.conf, "ceph-mgr", "x")


def _bootstrap_osd(c: CephCluster) -> None:
    osd_uuid = str(uuid.uuid4())
    osd_id = c.ceph("osd", "new", osd_uuid).strip()
    data = c.folder / f"osd/ceph-{osd_id}"
    data.mkdir(parents=True)
    _run(["ceph-osd", "-c", str(c.conf), "-i", osd_id, "--mkfs", "--mkkey", "--no-mon-config",
          "--osd-uuid", osd_uuid], timeout=60)
    c.ceph("auth", "add", f"osd.{osd_id}", "osd", "allow *", "mon", "allow profile osd", "mgr", "allow profile osd",
           "-i", str(data / "keyring"))
    _daemon(c.conf, "ceph-osd", osd_id)
    _wait_for("ceph-osd", lambda: '"num_up_osds":1' in c.ceph("osd", "stat", "-f", "json").replace(" ", ""))


def _create_pool(c: CephCluster, pool: str) -> None:
    c.ceph("osd", "pool", "create", pool, "8", "8")
    c.rbd("pool", "init", pool)


def create_pool(c: CephCluster, pool: str) -> None:
    """An extra pool (size 1) initialised for RBD."""
    _create_pool(c, pool)


def _pids(folder: Path) -> dict[Path, int]:
    found = {}
    for pidfile in sorted((folder / "run").glob("*.pid")):
        with contextlib.suppress(ValueError, OSError):
            found[pidfile] = int(pidfile.read_text().strip())
    return found


def _is_ours(pid: int, folder: Path) -> bool:
    """The pid still runs a Ceph daemon with our config (pids get reused)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return bool(cmdline) and os.path.basename(cmdline[0].decode()) in DAEMONS and str(folder).encode() in b" ".join(
        cmdline
    )


def stop(folder: str | os.PathLike[str], timeout: float = 10) -> None:
    """Stop exactly the daemons started under ``folder`` (osd, mgr, mon order)."""
    root = Path(folder).resolve()
    order = {"client": -1, "osd": 0, "mgr": 1, "mon": 2}   # client.rgw.x (radosgw) first
    pids = sorted(_pids(root).items(), key=lambda kv: order.get(kv[0].name.split(".")[0], 3))
    for pidfile, pid in pids:
        if _is_ours(pid, root):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            _wait_gone(pid, root, timeout)
        pidfile.unlink(missing_ok=True)


def _wait_gone(pid: int, root: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while _is_ours(pid, root):
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + timeout
        time.sleep(0.05)


def running(folder: str | os.PathLike[str]) -> list[int]:
    root = Path(folder).resolve()
    return [pid for pid in _pids(root).values() if _is_ours(pid, root)]


def load(folder: str | os.PathLike[str]) -> CephCluster:
    """Describe a cluster that :func:`start` created earlier (e.g. from the shell script)."""
    root = Path(folder).resolve()
    conf = root / "ceph.conf"
    values: dict[str, str] = {}
    for line in conf.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values.setdefault(key.strip(), value.strip())
    v2, v1 = (int(part.split(":")[-1]) for part in values["mon host"].strip("[]").split(","))
    return CephCluster(
        folder=root, conf=conf, keyring=root / f"ceph.client.{CLIENT_ID}.keyring", client_id=CLIENT_ID,
        fsid=values["fsid"], mon_addr="127.0.0.1", mon_port_v1=v1, mon_port_v2=v2,
    )


TEMP_PREFIX = "vnbd-ceph-"
OWNER_FILE = "owner.pid"


def reap_orphans(parent: str | None = None) -> list[Path]:
    """Stop and remove temp clusters whose owning process died (a killed test session).

    Only folders this module created (prefix + owner file) are considered, and only
    daemons whose command line names that folder are stopped.
    """
    reaped = []
    for folder in Path(parent or tempfile.gettempdir()).glob(f"{TEMP_PREFIX}*"):
        try:
            owner = int((folder / OWNER_FILE).read_text().strip())
        except (OSError, ValueError):
            continue
        if owner != os.getpid() and not Path(f"/proc/{owner}").exists():
            stop(folder)
            shutil.rmtree(folder, ignore_errors=True)
            reaped.append(folder)
    return reaped


@contextlib.contextmanager
def running_cluster(memstore_bytes: int = DEFAULT_MEMSTORE_BYTES, folder: str | None = None) -> Iterator[CephCluster]:
    """Start a cluster in a temp folder (or ``folder``), stop it and remove the folder on exit."""
    if folder is None:
        reap_orphans()
    root = Path(folder) if folder else Path(tempfile.mkdtemp(prefix=TEMP_PREFIX))
    try:
        cluster = start(root, memstore_bytes)
        if folder is None:
            (root / OWNER_FILE).write_text(f"{os.getpid()}\n")
        try:
            yield cluster
        finally:
            stop(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def ceph_cluster() -> Iterator[CephCluster]:
    """Session-wide test cluster: ``.conf``, ``.keyring``, ``.client_id``, pool ``rbd``."""
    if not available():
        pytest.skip("Ceph daemons (ceph-mon, ceph-osd, ceph-mgr) are not installed")
    with running_cluster() as cluster:
        yield cluster


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/lab/ceph", description="throw-away single-node Ceph")
    parser.add_argument("action", choices=("start", "stop", "status", "env"))
    parser.add_argument("folder")
    parser.add_argument("--memstore-bytes", type=int, default=DEFAULT_MEMSTORE_BYTES)
    args = parser.parse_args(argv)
    try:
        if args.action == "start":
            t0 = time.monotonic()
            c = start(args.folder, args.memstore_bytes)
            print(f"ceph: running in {time.monotonic() - t0:.1f}s: conf={c.conf} id={c.client_id} keyring={c.keyring}")
        elif args.action == "stop":
            stop(args.folder)
            print("ceph: stopped")
        elif args.action == "status":
            pids = running(args.folder)
            print(f"ceph: {len(pids)} daemons running {pids}")
            return 0 if pids else 1
        else:
            c = load(args.folder)
            print(f"CEPH_CONF={c.conf}\nCEPH_ID={c.client_id}\nCEPH_KEYRING={c.keyring}")
    except CephLabError as err:
        print(f"ceph: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())


# --------------------------------------------------------------------------
# libvirt domains with RBD network disks


@contextlib.contextmanager
def libvirt_secret(conn: Any, cluster: CephCluster, usage: str | None = None) -> Iterator[str]:
    """A libvirt ceph secret holding the cluster's client key; yields its UUID, undefined on exit."""
    import base64

    usage = usage or f"client.{cluster.client_id} vnbdtest-{uuid.uuid4().hex[:8]}"
    secret = conn.secretDefineXML(
        f"<secret ephemeral='no' private='no'><usage type='ceph'><name>{usage}</name></usage></secret>")
    try:
        secret.setValue(base64.b64decode(cluster.key))
        yield str(secret.UUIDString())
    finally:
        secret.undefine()


def rbd_disk_xml(cluster: CephCluster, image: str, target: str, secret_uuid: str, *, pool: str | None = None,
                 bus: str = "sata", fmt: str = "raw") -> str:
    return f"""<disk type='network' device='disk'>
      <driver name='qemu' type='{fmt}' cache='writeback' discard='unmap'/>
      <auth username='{cluster.client_id}'><secret type='ceph' uuid='{secret_uuid}'/></auth>
      <source protocol='rbd' name='{pool or cluster.pool}/{image}'>
        <host name='127.0.0.1' port='{cluster.mon_port_v1}'/>
      </source>
      <target dev='{target}' bus='{bus}'/>
    </disk>"""


def swap_disk_to_rbd(conn: Any, domain_xml: str, target: str, disk_xml: str) -> str:
    """``domain_xml`` with the disk ``target`` replaced by ``disk_xml`` (an RBD network disk)."""
    from lxml import etree

    root = etree.fromstring(domain_xml.encode())
    for disk in root.findall("devices/disk"):
        t = disk.find("target")
        if t is not None and t.get("dev") == target:
            disk.addnext(etree.fromstring(disk_xml.encode()))
            disk.getparent().remove(disk)
            return etree.tostring(root, encoding="unicode")
    raise CephLabError(f"no disk {target} in the domain XML")
