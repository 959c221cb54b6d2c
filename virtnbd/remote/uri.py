"""Which libvirt URIs reach another host, and the ssh facts in them.

``qemu+ssh://USER@HOST:PORT/system?keyfile=KEY`` (OpenSSH), ``qemu+libssh://``/``qemu+libssh2://``
(libvirt's own ssh clients), ``qemu+tls://`` / ``qemu://HOST/`` (libvirt's TLS) and ``qemu+tcp://``
are remote; ``qemu:///system``, ``qemu+unix://`` and URIs without a host are local.
"""
from __future__ import annotations

import urllib.parse
from dataclasses import dataclass

SSH_TRANSPORTS = ("ssh", "libssh", "libssh2")
REMOTE_TRANSPORTS = (*SSH_TRANSPORTS, "tls", "tcp")


@dataclass(frozen=True)
class RemoteUri:
    uri: str                        # as given
    driver: str                     # "qemu"
    transport: str                  # ssh | libssh | libssh2 | tls | tcp
    host: str                       # as written in the URI (the name certificates are issued for)
    user: str | None
    port: int | None                # ssh port when the transport is ssh-like
    keyfile: str | None
    query: tuple[tuple[str, str], ...]

    @property
    def ssh_port(self) -> int | None:
        return self.port if self.transport in SSH_TRANSPORTS else None

    def param(self, name: str) -> str | None:
        return next((v for k, v in self.query if k == name), None)

    def with_params(self, **params: str) -> str:
        """The URI with query parameters added (existing ones of that name are kept)."""
        parts = urllib.parse.urlsplit(self.uri)
        query = list(self.query) + [(k, v) for k, v in params.items() if self.param(k) is None]
        return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query, safe="/")))


def parse(uri: str | None) -> RemoteUri | None:
    """The remote facts of ``uri``; None for a local URI."""
    if not uri:
        return None
    parts = urllib.parse.urlsplit(uri)
    driver, _, transport = parts.scheme.partition("+")
    if not parts.hostname or transport in ("unix", "ext"):
        return None
    transport = transport or "tls"
    if transport not in REMOTE_TRANSPORTS:
        return None
    query = tuple(urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
    keyfile = next((v for k, v in query if k == "keyfile"), None)
    return RemoteUri(uri=uri, driver=driver, transport=transport, host=parts.hostname, user=parts.username,
                     port=parts.port, keyfile=keyfile, query=query)
