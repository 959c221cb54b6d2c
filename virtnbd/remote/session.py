"""Open the run's host: ``session(uri, options)`` yields the libvirt URI(s) to open and the Host.

A local URI gives :class:`LocalHost` and the URI unchanged. A remote one first opens the ssh
master connection (an unknown or changed host key, a refused login or an unreachable host stop
the run here, before libvirt or any disk is touched), then pins libvirt's own ssh to the same
known_hosts: ``qemu+ssh`` runs our ssh wrapper (``command=``: through the master connection),
``qemu+libssh``/``libssh2`` get ``known_hosts=``.

``qemu+ssh://…/system`` is first tried straight through the master: it forwards the host's
libvirt socket to a private unix socket here (``-L``, no remote shell, no ``virt-ssh-helper``:
one ssh session and ~0.5 s less per run), and libvirt opens ``qemu+unix:///system?socket=…``.
Where the host's sshd refuses socket forwarding, or its daemon has another socket, the usual
``qemu+ssh`` URI is next (:func:`virtnbd.virt.connection.connect` takes the first that opens).
"""
from __future__ import annotations

import contextlib
import logging
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from virtnbd import errors
from virtnbd.remote import uri as uri_mod
from virtnbd.remote.host import Host, LocalHost, using
from virtnbd.remote.options import RemoteOptions

if TYPE_CHECKING:
    from virtnbd.remote.ssh import SshConnection

log = logging.getLogger(__name__)

CLIENT_FILES = ("ca-cert.pem", "client-cert.pem", "client-key.pem")
# the host's libvirt sockets forwarded through the master: monolithic libvirtd (or virtproxyd), then virtqemud
LIBVIRT_SOCKETS = ("/var/run/libvirt/libvirt-sock", "/var/run/libvirt/virtqemud-sock")
CUSTOM_PARAMS = ("socket", "mode", "proxy", "netcat", "command", "name")   # the user chose how: no forward
NO_TLS_WARNING = "--no-tls: disk data crosses the network unencrypted and unauthenticated"


def check_tls_dir(options: RemoteOptions) -> None:
    missing = [f for f in CLIENT_FILES if not (Path(options.tls_dir) / f).is_file()]
    if missing:
        raise errors.UsageError(reason=f"--tls-cert {options.tls_dir}: {', '.join(missing)} missing; the folder "
                                       "needs the CA certificate and a client certificate + key signed by it (see "
                                       "README 'Backing up other hosts'), or run with --no-tls")


def forwarded_sockets(target: uri_mod.RemoteUri) -> tuple[str, ...]:
    """The host's libvirt sockets to forward for ``target`` (none: libvirt's own way only)."""
    path = urllib.parse.urlsplit(target.uri).path
    if target.transport != "ssh" or target.driver != "qemu" or path != "/system":
        return ()
    if any(target.param(name) is not None for name in CUSTOM_PARAMS):
        return ()
    return LIBVIRT_SOCKETS


def libvirt_uris(target: uri_mod.RemoteUri, ssh: SshConnection) -> tuple[str, ...]:
    """The URIs to try in order: the forwarded sockets, then libvirt's own transport."""
    direct = tuple(f"qemu+unix:///system?socket={here}" for here, _there in ssh.forwards)
    return (*direct, libvirt_uri(target, ssh))


def libvirt_uri(target: uri_mod.RemoteUri, ssh: SshConnection) -> str:
    if target.transport == "ssh":
        return target.with_params(command=ssh.wrapper)
    if target.transport in ("libssh", "libssh2"):
        return target.with_params(known_hosts=ssh.known_hosts)
    return target.uri


@contextlib.contextmanager
def session(uri: str | None, options: RemoteOptions) -> Iterator[tuple[str | tuple[str, ...] | None, Host]]:
    target = uri_mod.parse(uri)
    if target is None:
        with using(LocalHost()) as host:
            yield uri, host
        return
    if options.tls:
        check_tls_dir(options)
    else:
        log.warning("%s", NO_TLS_WARNING)
    from virtnbd.remote.remotehost import RemoteHost  # ssh and the remote shell: only for another host
    from virtnbd.remote.rshell import SHELL_ARGV
    from virtnbd.remote.ssh import SshConnection
    ssh = SshConnection(target, options, forwarded_sockets(target)).open(SHELL_ARGV)
    try:
        remote = RemoteHost(ssh, options)
        try:
            with using(remote) as host:
                yield libvirt_uris(target, ssh), host
        finally:
            remote.close()
    finally:
        ssh.close()


@contextlib.contextmanager
def connected(uri: str | None, options: RemoteOptions) -> Iterator[Any]:
    """A libvirt connection to ``uri`` (a remote one through :func:`session`), closed at exit."""
    from virtnbd.virt import connection

    with session(uri, options) as (libvirt_uri_, _host), \
            connection.connect(libvirt_uri_, options.password_file) as conn:
        yield conn
