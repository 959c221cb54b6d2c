"""This host as its own "remote KVM host": sshd, pinned host key, a throw-away CA, backup TLS.

What it sets up in one folder (``DIR``, default ``/var/lib/vnbdtest-remote`` or ``$VNBD_REMOTE_LAB``):

- ``DIR/pki``: a throw-away CA (``certtool``, Debian ``gnutls-bin``); ``pki/server`` holds
  ``ca-cert.pem``, ``server-cert.pem`` (CN and SAN ``localhost``, SAN IP ``127.0.0.1``),
  ``server-key.pem`` (owned by ``libvirt-qemu``, 0600: QEMU reads it itself) and ``dh-params.pem``; ``pki/client``
  (0700) holds ``ca-cert.pem``, ``client-cert.pem``, ``client-key.pem`` (0600) - the layout both
  QEMU's ``tls-creds-x509`` and libnbd's ``set_tls_certificates(DIR)`` read. ``pki/foreign``:
  a client certificate of ANOTHER CA (for refusal tests).
- ``/etc/libvirt/qemu.conf``: ``backup_tls_x509_cert_dir = "DIR/pki/server"`` and
  ``backup_tls_x509_verify = 1``. libvirtd reads qemu.conf only when it starts: ``start``
  restarts a running libvirtd only when the lines are newer than it (``configure`` never
  restarts: scripts/test writes the lines before it starts libvirtd).
- ``DIR/ssh``: a client key ``id`` (in ``authorized_keys``), a host key, and an ``sshd``
  on 127.0.0.1 on a spare port (kept in ``ssh/port``); ``DIR/known_hosts`` pins the host key
  for ``[localhost]:PORT`` and ``[127.0.0.1]:PORT``; ``DIR/known_hosts.changed`` holds a
  DIFFERENT key for the same names (host-key-changed tests).

The sshd is shared by every test session (started once, left running; ``stop`` ends it).

Shell: ``scripts/lab/remote start|stop|status|configure DIR`` (``start``/``status`` print
sourceable ``VNBD_REMOTE_*`` lines). pytest: the session fixture ``remote_lab`` (registered
in tests/conftest.py) gives a :class:`RemoteLab`.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.lab.common import LabError, require, run

DEFAULT_DIR = Path(os.environ.get("VNBD_REMOTE_LAB", "/var/lib/vnbdtest-remote"))
QEMU_CONF = Path(os.environ.get("VNBD_QEMU_CONF", "/etc/libvirt/qemu.conf"))
MARK = "# virtnbd remote lab (scripts/lab/remote): backup NBD jobs over TLS"
USER = "root"
HOST = "localhost"
SSHD = "/usr/sbin/sshd"
QEMU_USER = "libvirt-qemu"


@dataclass(frozen=True)
class RemoteLab:
    """What a test needs to reach this host as a remote one (all paths absolute)."""

    folder: Path
    port: int                 # sshd port on 127.0.0.1
    host: str = HOST
    user: str = USER

    @property
    def key(self) -> Path:
        """ssh client private key (authorized on the lab sshd)."""
        return self.folder / "ssh" / "id"

    @property
    def known_hosts(self) -> Path:
        """known_hosts pinning the lab sshd's host key."""
        return self.folder / "known_hosts"

    @property
    def changed_known_hosts(self) -> Path:
        """known_hosts with a different key for the same host names (a "changed" host key)."""
        return self.folder / "known_hosts.changed"

    @property
    def pki(self) -> Path:
        return self.folder / "pki"

    @property
    def client_tls(self) -> Path:
        """Client certificate dir (ca-cert.pem, client-cert.pem, client-key.pem)."""
        return self.pki / "client"

    @property
    def server_tls(self) -> Path:
        """Server certificate dir (what qemu.conf's backup_tls_x509_cert_dir names)."""
        return self.pki / "server"

    @property
    def foreign_tls(self) -> Path:
        """A client certificate dir signed by another CA (refused by the server)."""
        return self.pki / "foreign"

    def uri(self, scheme: str = "qemu+ssh") -> str:
        """libvirt URI of the "remote": ``qemu+ssh://root@localhost:PORT/system?keyfile=KEY``.

        ``qemu+libssh``/``qemu+libssh2`` get ``sshauth=privkey`` too. The known_hosts file is
        not in the URI: the tool under test is given it (``--ssh-known-hosts``).
        """
        extra = "&sshauth=privkey" if scheme.startswith("qemu+libssh") else ""
        return f"{scheme}://{self.user}@{self.host}:{self.port}/system?keyfile={self.key}{extra}"

    def pinned_uri(self) -> str:
        """A URI plain libvirt clients (virsh, libvirt.open) can use with the pinned host key."""
        return f"{self.uri('qemu+libssh')}&known_hosts={self.known_hosts}"

    def ssh_argv(self, *command: str) -> list[str]:
        """``ssh`` to the remote with the lab key and the pinned host key (no prompts)."""
        return ["ssh", "-p", str(self.port), "-i", str(self.key), "-o", "IdentitiesOnly=yes",
                "-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "StrictHostKeyChecking=yes",
                "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", f"{self.user}@{self.host}", "--", *command]

    def ssh(self, *command: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return run(self.ssh_argv(*command), timeout=timeout)

    def env(self) -> dict[str, str]:
        return {
            "VNBD_REMOTE_URI": self.uri(), "VNBD_REMOTE_LIBSSH_URI": self.uri("qemu+libssh"),
            "VNBD_REMOTE_KEY": str(self.key), "VNBD_REMOTE_KNOWN_HOSTS": str(self.known_hosts),
            "VNBD_REMOTE_TLS": str(self.client_tls), "VNBD_REMOTE_SERVER_TLS": str(self.server_tls),
            "VNBD_REMOTE_FOREIGN_TLS": str(self.foreign_tls), "VNBD_REMOTE_SSH_PORT": str(self.port),
        }


# --------------------------------------------------------------------------
# PKI


_CA = "cn = virtnbd lab CA {name}\nca\ncert_signing_key\nexpiration_days = 3650\n"
_SERVER = ("organization = virtnbd lab\ncn = localhost\ndns_name = localhost\nip_address = 127.0.0.1\n"
           "tls_www_server\nencryption_key\nsigning_key\nexpiration_days = 3650\n")
_CLIENT = ("organization = virtnbd lab\ncn = client\ntls_www_client\nencryption_key\nsigning_key\n"
           "expiration_days = 3650\n")


def _certtool(*args: str) -> None:
    run(["certtool", *args], timeout=60)


def _make_ca(tmp: Path, name: str) -> tuple[Path, Path]:
    (tmp / f"{name}.info").write_text(_CA.format(name=name))
    key, cert = tmp / f"{name}-key.pem", tmp / f"{name}-cert.pem"
    _certtool("--generate-privkey", "--outfile", str(key))
    _certtool("--generate-self-signed", "--load-privkey", str(key), "--template", str(tmp / f"{name}.info"),
              "--outfile", str(cert))
    return key, cert


def _issue(tmp: Path, ca: tuple[Path, Path], folder: Path, role: str, template: str) -> None:
    """``folder``/{ca-cert,ROLE-cert,ROLE-key}.pem signed by ``ca``."""
    folder.mkdir(parents=True, exist_ok=True)
    info = tmp / f"{folder.name}.info"
    info.write_text(template)
    key, cert = folder / f"{role}-key.pem", folder / f"{role}-cert.pem"
    _certtool("--generate-privkey", "--outfile", str(key))
    _certtool("--generate-certificate", "--load-privkey", str(key), "--load-ca-certificate", str(ca[1]),
              "--load-ca-privkey", str(ca[0]), "--template", str(info), "--outfile", str(cert))
    shutil.copyfile(ca[1], folder / "ca-cert.pem")


def _make_pki(pki: Path) -> None:
    """CA + server + client + a foreign CA's client, built aside and renamed into place."""
    tmp = pki.with_name(pki.name + ".new")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(mode=0o755)
    ca = _make_ca(tmp, "ca")
    _issue(tmp, ca, tmp / "server", "server", _SERVER)
    _issue(tmp, ca, tmp / "client", "client", _CLIENT)
    _issue(tmp, _make_ca(tmp, "foreign-ca"), tmp / "foreign", "client", _CLIENT)
    _set_modes(tmp)
    tmp.rename(pki)


def _dh_params(server: Path) -> None:
    """``dh-params.pem`` (RFC 7919 group): without it QEMU generates DH parameters at every job start (~0.7 s)."""
    target = server / "dh-params.pem"
    if target.exists():
        return
    tmp = server / ".dh-params.pem.tmp"
    _certtool("--get-dh-params", "--sec-param", "medium", "--outfile", str(tmp))
    tmp.chmod(0o644)
    os.replace(tmp, target)


def _set_modes(pki: Path) -> None:
    pki.chmod(0o755)
    (pki / "server").chmod(0o755)
    for f in (pki / "server").iterdir():
        f.chmod(0o644)
    key = pki / "server" / "server-key.pem"
    key.chmod(0o600)
    with contextlib.suppress(KeyError):
        os.chown(key, pwd.getpwnam(QEMU_USER).pw_uid, -1)   # QEMU reads it as libvirt-qemu
    for name in ("client", "foreign"):
        (pki / name).chmod(0o700)
        for f in (pki / name).iterdir():
            f.chmod(0o600 if f.name.endswith("-key.pem") else 0o644)
    for f in pki.glob("*-key.pem"):
        f.chmod(0o600)


# --------------------------------------------------------------------------
# qemu.conf


def conf_lines(folder: Path) -> list[str]:
    return [MARK, f'backup_tls_x509_cert_dir = "{folder / "pki" / "server"}"', "backup_tls_x509_verify = 1"]


def _conf_current(folder: Path) -> bool:
    lines = QEMU_CONF.read_text().splitlines() if QEMU_CONF.exists() else []
    return all(line in lines for line in conf_lines(folder)[1:])


def _write_conf(folder: Path) -> None:
    """Replace any active backup_tls_x509_* lines (and our mark) by ours; atomic, mode kept."""
    old = QEMU_CONF.read_text().splitlines() if QEMU_CONF.exists() else []
    ours = ("backup_tls_x509_cert_dir", "backup_tls_x509_verify")
    keep = [ln for ln in old if ln != MARK and not ln.startswith(ours)]
    tmp = QEMU_CONF.with_name(QEMU_CONF.name + ".vnbdtest")
    tmp.write_text("\n".join([*keep, *conf_lines(folder)]) + "\n")
    if QEMU_CONF.exists():
        shutil.copymode(QEMU_CONF, tmp)
    os.replace(tmp, QEMU_CONF)
    (folder / "qemu-conf.written").touch()


def configure(folder: Path) -> bool:
    """PKI and qemu.conf lines (never restarts libvirtd). True when qemu.conf changed."""
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o755)
    if not (folder / "pki" / "foreign" / "client-key.pem").exists():
        shutil.rmtree(folder / "pki", ignore_errors=True)
        _make_pki(folder / "pki")
    _dh_params(folder / "pki" / "server")
    if _conf_current(folder):
        return False
    _write_conf(folder)
    return True


def _boot_time() -> float:
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("btime "):
            return float(line.split()[1])
    raise LabError("no btime in /proc/stat")


def _started_at(pid: int) -> float:
    ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    return _boot_time() + ticks / os.sysconf("SC_CLK_TCK")


def libvirtd_stale(folder: Path) -> bool:
    """Is a libvirtd running that started before our qemu.conf lines were written?"""
    from tests.lab.libvirt_lab import pids_of

    stamp = folder / "qemu-conf.written"
    if not stamp.exists():
        return False
    written = stamp.stat().st_mtime
    return any(_started_at(pid) < written - 1 for pid in pids_of("libvirtd"))


def _restart_libvirtd_if_stale(folder: Path) -> bool:
    if not libvirtd_stale(folder):
        return False
    from tests.lab.libvirt_lab import restart_libvirtd

    print(f"remote lab: restarting libvirtd to load {QEMU_CONF} (backup TLS)", file=sys.stderr)
    restart_libvirtd()
    return True


# --------------------------------------------------------------------------
# sshd


def _ssh_dir(folder: Path) -> Path:
    return folder / "ssh"


def _keygen(path: Path) -> None:
    if not path.exists():
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "virtnbd-lab", "-f", str(path)])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _sshd_pid(folder: Path) -> int | None:
    try:
        pid = int((_ssh_dir(folder) / "sshd.pid").read_text())
    except (OSError, ValueError):
        return None
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None
    return pid if exe == SSHD else None


def _write_known_hosts(folder: Path, port: int) -> None:
    names = f"[{HOST}]:{port},[127.0.0.1]:{port}"
    s = _ssh_dir(folder)
    pairs = ((folder / "known_hosts", s / "hostkey.pub"), (folder / "known_hosts.changed", s / "otherkey.pub"))
    for target, pub in pairs:
        kind, key = pub.read_text().split()[:2]
        target.write_text(f"{names} {kind} {key}\n")
        target.chmod(0o644)


def _sshd_argv(folder: Path, port: int) -> list[str]:
    s = _ssh_dir(folder)
    opts = {
        "ListenAddress": f"127.0.0.1:{port}", "PermitRootLogin": "prohibit-password",
        "PasswordAuthentication": "no", "KbdInteractiveAuthentication": "no",
        "AuthorizedKeysFile": str(s / "authorized_keys"), "StrictModes": "no", "UsePAM": "no",
        "PidFile": str(s / "sshd.pid"), "UseDNS": "no", "MaxStartups": "100:30:200", "MaxSessions": "100",
        "LogLevel": "ERROR", "PrintMotd": "no",
    }
    argv = [SSHD, "-f", "/dev/null", "-h", str(s / "hostkey"), "-E", str(s / "sshd.log")]
    for k, v in opts.items():
        argv += ["-o", f"{k}={v}"]
    return argv


def _port_of(folder: Path) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int((_ssh_dir(folder) / "port").read_text())
    return None


def _start_sshd(folder: Path) -> int:
    s = _ssh_dir(folder)
    port = _port_of(folder)
    if _sshd_pid(folder) and port:
        return port
    if port is None or not _port_free(port):
        port = _free_port()
    (s / "port").write_text(f"{port}\n")
    _write_known_hosts(folder, port)
    Path("/run/sshd").mkdir(exist_ok=True)   # sshd's privilege-separation folder
    run(_sshd_argv(folder, port), timeout=30)
    _wait(lambda: _answers(port), 10, f"sshd on 127.0.0.1:{port} (log {s / 'sshd.log'})")
    return port


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _answers(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=2) as c:
        return c.recv(4).startswith(b"SSH-")
    return False


def _wait(check, secs: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + secs
    while not check():
        if time.monotonic() > deadline:
            raise LabError(f"{what} does not answer after {secs:.0f}s")
        time.sleep(0.1)


def _ssh_keys(folder: Path) -> None:
    s = _ssh_dir(folder)
    s.mkdir(mode=0o700, exist_ok=True)
    for name in ("id", "hostkey", "otherkey"):
        _keygen(s / name)
    (s / "authorized_keys").write_text((s / "id.pub").read_text())
    (s / "authorized_keys").chmod(0o600)


# --------------------------------------------------------------------------
# the lab


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder.parent / f".{folder.name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def start(folder: Path = DEFAULT_DIR, restart: bool = True) -> RemoteLab:
    """Everything up (idempotent); restarts libvirtd only when qemu.conf is newer than it."""
    folder = folder.resolve()
    with _locked(folder):
        configure(folder)
        if restart:
            _restart_libvirtd_if_stale(folder)
        _ssh_keys(folder)
        return RemoteLab(folder=folder, port=_start_sshd(folder))


def load(folder: Path = DEFAULT_DIR) -> RemoteLab:
    """The running lab in ``folder`` (LabError when its sshd is not running)."""
    folder = folder.resolve()
    port = _port_of(folder)
    if port is None or _sshd_pid(folder) is None:
        raise LabError(f"remote lab {folder}: sshd not running (scripts/lab/remote start {folder})")
    return RemoteLab(folder=folder, port=port)


def stop(folder: Path = DEFAULT_DIR) -> bool:
    """Stop the lab's sshd (PKI, keys and the qemu.conf lines stay). True when one was stopped."""
    folder = folder.resolve()
    pid = _sshd_pid(folder)
    if pid is None:
        return False
    os.kill(pid, signal.SIGTERM)
    _wait(lambda: not Path(f"/proc/{pid}").exists(), 10, f"sshd {pid} stopping")
    return True


def available() -> bool:
    return all(shutil.which(t) for t in ("certtool", "ssh", "ssh-keygen")) and Path(SSHD).exists()


@pytest.fixture(scope="session")
def remote_lab(libvirt_daemons: object) -> RemoteLab:
    """This host as a remote KVM host: sshd, pinned host key, client/server certs, backup TLS on."""
    require("remote lab", ("certtool", "ssh", "ssh-keygen", SSHD), root=True)
    try:
        return start(DEFAULT_DIR)
    except (LabError, OSError) as exc:
        pytest.fail(f"remote lab: {exc}", pytrace=False)


# --------------------------------------------------------------------------
# command line (scripts/lab/remote)


def _print_env(lab: RemoteLab) -> None:
    for k, v in lab.env().items():
        print(f"export {k}='{v}'")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/lab/remote", description="this host as its own remote KVM host")
    parser.add_argument("action", choices=("start", "stop", "status", "configure"))
    parser.add_argument("folder", nargs="?", default=str(DEFAULT_DIR))
    args = parser.parse_args(argv)
    folder = Path(args.folder).resolve()
    try:
        if args.action == "configure":
            changed = configure(folder)
            print(f"remote lab: qemu.conf {'updated' if changed else 'already set'} ({folder / 'pki/server'})")
            if libvirtd_stale(folder):
                print("remote lab: the running libvirtd predates these lines: `start` restarts it")
        elif args.action == "start":
            _print_env(start(folder))
        elif args.action == "stop":
            print("remote lab: sshd stopped" if stop(folder) else "remote lab: no sshd running")
        else:
            lab = load(folder)
            if not _conf_current(folder) or libvirtd_stale(folder):
                raise LabError(f"{QEMU_CONF} lacks this lab's backup TLS lines or libvirtd has not loaded them")
            _print_env(lab)
    except (LabError, OSError) as err:
        print(f"remote lab: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
