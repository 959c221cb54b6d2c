"""Remote hosts, pure logic: which URIs are remote, host-key pinning, error lines, job XML, options."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from virtnbd import errors
from virtnbd.cli import backup
from virtnbd.remote import session, ssh, uri
from virtnbd.remote.options import RemoteOptions
from virtnbd.remote.remotehost import _job_error, ports
from virtnbd.source.nbdsource import TcpAddress, explain_tcp
from virtnbd.virt import job, xmlbuild

B = ["-d", "vm", "-o", "/b"]


@pytest.mark.parametrize("text", [None, "", "qemu:///system", "qemu:///session", "qemu+unix:///system",
                                  "qemu+ext:///system?command=/bin/x"])
def test_local_uris(text: str | None) -> None:
    assert uri.parse(text) is None


def test_remote_uri_parts_and_pinning() -> None:
    r = uri.parse("qemu+ssh://backup@kvm1.example.com:2222/system?keyfile=/k/id&no_tty=1")
    assert r is not None
    assert (r.transport, r.host, r.user, r.ssh_port, r.keyfile) == ("ssh", "kvm1.example.com", "backup", 2222, "/k/id")
    pinned = r.with_params(command="/tmp/x/ssh", keyfile="/other")
    assert "command=/tmp/x/ssh" in pinned and "keyfile=/k/id" in pinned and "/other" not in pinned
    tls = uri.parse("qemu://kvm2/system")
    assert tls is not None and tls.transport == "tls" and tls.ssh_port is None
    assert uri.parse("qemu+libssh://root@h/system").transport == "libssh"  # type: ignore[union-attr]


def test_ssh_failures_name_cause_and_fix() -> None:
    changed = ssh.explain("@@@ WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED! @@@\nHost key verification failed.",
                          "h:22", "/kh")
    assert "CHANGED" in changed and "/kh" in changed
    unknown = ssh.explain("No ED25519 host key is known for [h]:22 and you have requested strict checking.\n"
                          "Host key verification failed.", "h:22", "/kh")
    assert "unknown" in unknown and "never accepted" in unknown
    assert "authorized" in ssh.explain("root@h: Permission denied (publickey).", "h", "/kh")
    assert "firewall" in ssh.explain("ssh: connect to host h port 22: Connection refused", "h", "/kh")


def test_nbd_tls_failures_name_cause_and_fix() -> None:
    a = TcpAddress("kvm1", 10809, "/pki")
    assert "does not match the name kvm1" in explain_tcp(a, "gnutls_handshake: Error in the certificate verification.")
    assert "refused our TLS client certificate" in explain_tcp(
        a, "gnutls_record_recv: The TLS connection was non-properly terminated.")
    assert "firewall" in explain_tcp(a, "connect: Connection refused")
    assert str(a) == "nbds://kvm1:10809" and str(TcpAddress("h", 1)) == "nbd://h:1"


def test_job_errors() -> None:
    tls = _job_error(errors.LibvirtError(reason="unable to execute QEMU command 'object-add': Unable to access "
                                                "credentials /etc/pki/qemu/ca-cert.pem"), "h")
    assert isinstance(tls, errors.RemoteError)
    assert "backup_tls_x509_cert_dir" in tls.message and "--no-tls" in tls.message
    other = errors.LibvirtError(reason="domain is not running")
    assert _job_error(other, "h") is other
    assert list(ports(10809))[:2] == [10809, 10810] and len(ports(10809)) == 64


def test_tcp_job_xml_and_owner() -> None:
    xml = xmlbuild.backup_xml(xmlbuild.TcpServer("kvm1", 10811), [xmlbuild.BackupDisk("sda", "/s/virtnbd.42.ab/x")])
    assert "<server transport=\"tcp\" tls=\"yes\" name=\"kvm1\" port=\"10811\"/>" in xml.replace("'", '"')
    assert xmlbuild.backup_socket(xml) == "/s/virtnbd.42.ab/x" and job.owner_pid(xmlbuild.backup_socket(xml)) == 42
    plain = xmlbuild.backup_xml(xmlbuild.TcpServer("kvm1", 1, tls=False), [xmlbuild.BackupDisk("sda", "/s")])
    assert 'tls="no"' in plain.replace("'", '"')


def test_options_and_client_certificates(tmp_path: Path) -> None:
    o = backup.parse([*B, "-U", "qemu+ssh://h/system"]).remote
    assert o == RemoteOptions()
    o = backup.parse([*B, "--no-tls", "-P", "20000", "-I", "10.0.0.5", "--ssh-known-hosts", "/kh",
                      "--tls-cert", str(tmp_path), "--connect-timeout", "5"]).remote
    assert (o.tls, o.first_port, o.nbd_ip, o.known_hosts, o.tls_dir, o.timeout) == (
        False, 20000, "10.0.0.5", "/kh", str(tmp_path), 5)
    with pytest.raises(errors.UsageError, match="out of range"):
        backup.parse([*B, "-P", "65500"])
    with pytest.raises(errors.UsageError, match="client-cert.pem, client-key.pem missing"):
        session.check_tls_dir(RemoteOptions(tls_dir=str(tmp_path)))
    for name in session.CLIENT_FILES:
        (tmp_path / name).write_text("x")
    session.check_tls_dir(RemoteOptions(tls_dir=str(tmp_path)))


def test_sweep_removes_private_folders_of_dead_runs_only(tmp_path: Path) -> None:
    """A SIGKILLed run leaves its ssh folder (control socket, askpass) and forward socket folder here."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = [tmp_path / f"virtnbd-ssh.{dead.pid}.abc", tmp_path / f"virtnbd-remote-{dead.pid}.def"]
    kept = [tmp_path / f"virtnbd-ssh.{os.getpid()}.ghi", tmp_path / "virtnbd-ssh.x1.jkl", tmp_path / "other.1.x"]
    for folder in stale + kept:
        folder.mkdir()
        (folder / "ctl").write_text("")
    removed = ssh.sweep_stale(str(tmp_path))
    assert sorted(removed) == sorted(str(p) for p in stale)
    assert all(p.exists() for p in kept) and not any(p.exists() for p in stale)


@pytest.mark.parametrize(("text", "forwarded"), [
    ("qemu+ssh://root@h/system?keyfile=/k", session.LIBVIRT_SOCKETS),
    ("qemu+ssh://root@h:2222/system", session.LIBVIRT_SOCKETS),
    ("qemu+ssh://root@h/session", ()),                                      # per-user daemon: libvirt's way
    ("qemu+ssh://root@h/system?socket=/run/x.sock", ()),                    # the user chose the socket
    ("qemu+ssh://root@h/system?mode=direct", ()),
    ("qemu+ssh://root@h/system?proxy=netcat", ()),
    ("qemu+libssh://root@h/system", ()),                                    # libvirt's own ssh client
    ("qemu+tls://h/system", ()),
])
def test_libvirt_socket_forwarded_only_where_libvirt_would_pick_it(text: str, forwarded: tuple[str, ...]) -> None:
    target = uri.parse(text)
    assert target is not None
    assert session.forwarded_sockets(target) == forwarded
