"""Command-line options for remote hosts (-U qemu+ssh://...) -> frozen RemoteOptions."""
from __future__ import annotations

import argparse

from virtnbd import errors
from virtnbd.cli.hostargs import checked_uri
from virtnbd.remote.options import CONNECT_TIMEOUT, DEFAULT_TLS_DIR, RemoteOptions


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 1 <= port <= 65535 - 63:
        raise argparse.ArgumentTypeError(f"port {port} out of range 1-65472 (the run may try up to 63 above it)")
    return port


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("remote hosts (-U qemu+ssh://USER@HOST[:PORT]/system?keyfile=KEY, "
                                  "qemu+libssh://, qemu+tls://; see README 'Backing up other hosts')")
    g.add_argument("--tls-cert", default=DEFAULT_TLS_DIR, metavar="DIR",
                   help=f"client certificates for NBD over TLS: ca-cert.pem, client-cert.pem, client-key.pem "
                        f"(default {DEFAULT_TLS_DIR})")
    g.add_argument("--no-tls", action="store_true",
                   help="read a remote host's disks over plain TCP (unencrypted: a warning in the log and --json)")
    g.add_argument("-I", "--nbd-ip", default=None, metavar="ADDR",
                   help="address the remote NBD server listens on and this host dials (default: the URI's host; "
                        "the host's certificate must name it)")
    g.add_argument("-P", "--nbd-port", type=_port, default=None, metavar="PORT",
                   help="first TCP port tried for the remote NBD server (default 10809; a port in use is retried "
                        "on another of PORT..PORT+63)")
    g.add_argument("--ssh-known-hosts", default=None, metavar="FILE",
                   help="known_hosts file the remote host's ssh key is checked against (default ~/.ssh/known_hosts; "
                        "an unknown or changed key stops the run)")
    g.add_argument("--password-file", metavar="FILE",
                   help="libvirt's password (or ssh key passphrase) for -U: the first line of FILE (mode 0600); "
                        "never on the command line")
    g.add_argument("--connect-timeout", type=int, default=CONNECT_TIMEOUT, metavar="SECONDS",
                   help=f"timeout of every connect to a remote host: ssh, NBD (default {CONNECT_TIMEOUT})")


def remote_options(args: argparse.Namespace) -> RemoteOptions:
    if args.connect_timeout <= 0:
        raise errors.UsageError(reason="--connect-timeout must be positive")
    checked_uri(getattr(args, "uri", None), args.password_file)
    return RemoteOptions(tls=not args.no_tls, tls_dir=args.tls_cert, nbd_ip=args.nbd_ip, nbd_port=args.nbd_port,
                         known_hosts=args.ssh_known_hosts, timeout=args.connect_timeout,
                         password_file=args.password_file)
