"""The restore command's options as one frozen record (built by cli/restore.py)."""
from __future__ import annotations

from dataclasses import dataclass, field

from virtnbd.crypto.keysource import KeySpec
from virtnbd.restore.targets.rbd import RbdOptions


@dataclass(frozen=True)
class RemoteOptions:
    """What virtnbdrestore's options say about a remote host (built by cli/restore.py; used by
    restore/targets/remote.py, which is imported only for a remote restore)."""

    uri: str                                  # qemu+ssh://USER@HOST[:PORT]/system[?keyfile=...]
    known_hosts: str | None = None            # --ssh-known-hosts
    tls_cert: str | None = None               # --tls-cert DIR here (ca-cert, client-cert, client-key)
    server_tls_dir: str | None = None         # --nbd-tls-dir on the host; None: from its qemu.conf
    nbd_ip: str | None = None                 # --nbd-ip: the host's address qemu-nbd binds and we dial
    nbd_port: int | None = None               # --nbd-port: first port tried
    tls: bool = True                          # --no-tls: plain NBD (a warning)


ACTIONS = ("restore", "dump", "verify", "instant", "drill")
FORMATS = ("qcow2", "raw")


@dataclass(frozen=True)
class RestoreOptions:
    input: str                          # backup set folder
    output: str | None = None           # output folder (or a target spec such as rbd:POOL)
    action: str = "restore"             # restore | dump | verify
    until: str | None = None            # point name (checkpoint) to restore; None = newest
    disk: str | None = None             # restore only this disk (target dev)
    sequence: tuple[str, ...] = ()      # explicit list of stream files, root first
    format: str = "qcow2"               # output image format
    preallocate: bool = False
    adjust_config: bool = False
    name: str | None = None             # name of the adjusted domain (default restore_<name>)
    define: bool = False
    uri: str = "qemu:///system"
    json: bool = False                  # dump as JSON
    noprogress: bool = False
    verbose: bool = False
    strict: bool = False
    worker: int = 4                     # parallel requests in flight / verify files at once
    targets: tuple[tuple[str, str], ...] = ()    # --target: (disk or "" for the only disk, rbd:POOL/IMAGE)
    rbd: RbdOptions = field(default_factory=RbdOptions)   # Ceph connection + RBD image options
    logfile: str | None = None          # -L/--logfile: also log (DEBUG) to this file
    key: KeySpec = field(default_factory=KeySpec)         # encrypted sets: names the secret's source
    password_file: str | None = None    # --password-file: libvirt's password / key passphrase for -U
    remote: RemoteOptions | None = None  # -U names another host: -o is a folder there (restore/targets/remote.py)
    # -a instant / -a drill (restore/instant.py, restore/drill.py)
    bandwidth: int | None = None        # instant: MiB/s limit of the background copy
    paused: bool = False                # instant: start the domain paused
    no_migrate: bool = False            # instant: run on the backup only, no copy (until stopped)
    check: str | None = None            # drill: shell command run in the guest by the agent (pass = exit 0)
    boot_timeout: float = 300.0         # drill: seconds to wait for the agent (and for the check)
