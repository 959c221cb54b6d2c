"""Options for libvirt URIs and other hosts: ``--password-file``; virtnbdrestore's remote-host options.

A URI on the command line must not carry a secret (``user:pass@``, ``?password=``): it would show
in ``ps``, shell history and logs. The password goes into a file given with ``--password-file``.
"""
from __future__ import annotations

import argparse

from virtnbd import errors, secrets
from virtnbd.remote.uri import parse as parse_uri
from virtnbd.restore.options import RemoteOptions


def add_password_file(p: argparse.ArgumentParser) -> None:
    p.add_argument("--password-file", metavar="FILE",
                   help="libvirt's password (or ssh key passphrase) for -U: the first line of FILE (mode 0600)")


def checked_uri(uri: str | None, password_file: str | None) -> str | None:
    """``-U`` refused when it carries a secret; ``--password-file`` checked (exists, private)."""
    if uri:
        secrets.refuse_uri_secret(uri, "-U/--uri")
    if password_file:
        secrets.check_private(password_file, "password file")
    return uri


def add_restore_host(p: argparse.ArgumentParser) -> None:
    add_password_file(p)
    g = p.add_argument_group("restore onto another host (-U qemu+ssh://USER@HOST/system: -o is a folder there)")
    g.add_argument("--ssh-known-hosts", metavar="FILE",
                   help="known_hosts file that pins the host's ssh key (default: OpenSSH's own); an unknown or "
                        "changed key fails the run")
    g.add_argument("--tls-cert", metavar="DIR",
                   help="client certificates for the host's qemu-nbd: DIR/ca-cert.pem, client-cert.pem, "
                        "client-key.pem (0600); default /etc/pki/qemu, as for virtnbdbackup")
    g.add_argument("--nbd-tls-dir", metavar="DIR",
                   help="server certificate folder ON THE HOST (default: backup_tls_x509_cert_dir of its qemu.conf, "
                        "else default_tls_x509_cert_dir, else /etc/pki/qemu)")
    g.add_argument("-I", "--nbd-ip", metavar="ADDR",
                   help="address of the host that its qemu-nbd binds and we dial (default: its loopback, "
                        "reached through the ssh connection)")
    g.add_argument("-P", "--nbd-port", type=int, metavar="PORT",
                   help="first port tried for the host's qemu-nbd (default: random free port in 10900-11899)")
    g.add_argument("--no-tls", action="store_true", help="plain NBD to the host's qemu-nbd (a warning: unencrypted)")


def remote_options(args: argparse.Namespace) -> RemoteOptions | None:
    """RemoteOptions when -U names another host and the action writes images; else None."""
    wanted = [o for o in ("ssh_known_hosts", "tls_cert", "nbd_tls_dir", "nbd_ip", "nbd_port") if getattr(args, o)]
    if parse_uri(args.uri) is None or args.action != "restore":
        if wanted or args.no_tls:
            flag = "--no-tls" if not wanted else "--" + wanted[0].replace("_", "-")
            raise errors.UsageError(reason=f"{flag} goes with a remote restore (-U qemu+ssh://USER@HOST/system)")
        return None
    if args.nbd_port is not None and not 0 < args.nbd_port < 65536:
        raise errors.UsageError(reason=f"--nbd-port {args.nbd_port}: not a port number")
    if args.no_tls and args.tls_cert:
        raise errors.UsageError(reason="--no-tls and --tls-cert exclude each other")
    return RemoteOptions(uri=args.uri, known_hosts=args.ssh_known_hosts, tls_cert=args.tls_cert,
                         server_tls_dir=args.nbd_tls_dir, nbd_ip=args.nbd_ip, nbd_port=args.nbd_port,
                         tls=not args.no_tls)
