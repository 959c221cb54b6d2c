"""The remote-host lab itself (tests/lab/remote_lab.py): pinned sshd, libvirt over ssh, backup NBD over TLS.

Proves what every remote test relies on: the host key is checked (a changed one is refused), libvirt
answers over ssh, and a pull backup job listens with TLS and client-certificate checking (the lab's
client certificate reads the disk byte for byte; another CA's is refused).
"""
from __future__ import annotations

import socket
import subprocess

import pytest

from tests.lab.libvirt_lab import DiskSpec, MiB
from tests.lab.remote_lab import RemoteLab

pytestmark = pytest.mark.system


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _read(lab_dir: str, port: int, size: int) -> bytes:
    import nbd

    h = nbd.NBD()
    h.set_tls(nbd.TLS_REQUIRE)
    h.set_tls_certificates(lab_dir)
    h.set_export_name("sda")
    h.connect_tcp("localhost", str(port))
    try:
        return bytes(h.pread(size, 0))
    finally:
        h.shutdown()


def test_ssh_pins_the_host_key(remote_lab: RemoteLab) -> None:
    assert remote_lab.ssh("id", "-u").stdout.strip() == "0"
    argv = remote_lab.ssh_argv("true")
    pinned = argv.index(f"UserKnownHostsFile={remote_lab.known_hosts}")
    argv[pinned] = f"UserKnownHostsFile={remote_lab.changed_known_hosts}"
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 255 and "Host key verification failed" in proc.stderr


def test_tls_backup_job_over_ssh(remote_lab: RemoteLab, make_domain) -> None:  # type: ignore[no-untyped-def]
    import libvirt
    import nbd

    dom = make_domain(disks=[DiskSpec("sda", "sata", "qcow2", 4 * MiB)])
    dom.disk("sda").write_data(MiB, MiB, seed=7)
    conn = libvirt.open(remote_lab.pinned_uri())
    try:
        assert conn.getHostname() == socket.gethostname()
        rdom = conn.lookupByName(dom.name)
        port = _free_port()
        rdom.backupBegin(f"""<domainbackup mode='pull'>
  <server transport='tcp' tls='yes' name='localhost' port='{port}'/>
  <disks><disk name='sda' backup='yes' type='file'><scratch file='{dom.dir}/scratch-sda.qcow2'/></disk></disks>
</domainbackup>""", None, 0)
        try:
            assert _read(str(remote_lab.client_tls), port, 4 * MiB) == dom.disk("sda").expected(0, 4 * MiB)
            with pytest.raises(nbd.Error):
                _read(str(remote_lab.foreign_tls), port, 4096)
        finally:
            rdom.abortJob()
    finally:
        conn.close()


def test_libvirt_through_the_master_forward_and_fallback(remote_lab: RemoteLab) -> None:
    """qemu+ssh reaches the host's libvirt socket through the ssh master (no remote shell); a URI that
    does not open is passed over for the next one."""
    from virtnbd.remote.options import RemoteOptions
    from virtnbd.remote.session import connected
    from virtnbd.virt import connection

    options = RemoteOptions(tls_dir=str(remote_lab.client_tls), known_hosts=str(remote_lab.known_hosts))
    with connected(remote_lab.uri(), options) as conn:
        assert conn.getURI().startswith("qemu+unix:///system?socket=")
        assert conn.getHostname() == socket.gethostname()
    with connection.connect(["qemu+unix:///system?socket=/nonexistent/libvirt-sock", "qemu:///system"]) as conn:
        assert conn.getURI() == "qemu:///system"
