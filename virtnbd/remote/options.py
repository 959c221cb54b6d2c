"""What the command line says about remote hosts (frozen; built by cli/remoteargs.py)."""
from __future__ import annotations

from dataclasses import dataclass

DEFAULT_TLS_DIR = "/etc/pki/qemu"
DEFAULT_NBD_PORT = 10809
PORT_RANGE = 64                 # ports tried from the first one: open FIRST..FIRST+63 in the firewall
CONNECT_TIMEOUT = 30


@dataclass(frozen=True)
class RemoteOptions:
    tls: bool = True                        # False only with an explicit --no-tls
    tls_dir: str = DEFAULT_TLS_DIR          # client certificates: ca-cert.pem, client-cert.pem, client-key.pem
    nbd_ip: str | None = None               # address the remote NBD server listens on and the client dials
    nbd_port: int | None = None             # first port tried (default 10809)
    known_hosts: str | None = None          # None: OpenSSH's default (~/.ssh/known_hosts)
    timeout: int = CONNECT_TIMEOUT          # seconds for every connect (ssh, NBD)
    password_file: str | None = None        # --password-file: libvirt's password / key passphrase (never argv)

    @property
    def first_port(self) -> int:
        return self.nbd_port or DEFAULT_NBD_PORT
