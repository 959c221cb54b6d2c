"""The options of virtnbdmap and virtnbdmount as frozen records (built by cli/)."""
from __future__ import annotations

from dataclasses import dataclass, field

from virtnbd.crypto.keysource import KeySpec


@dataclass(frozen=True)
class MapOptions:
    input: str                          # backup set folder
    until: str | None = None            # point; None = newest
    disk: str | None = None             # disk; None = the only one
    socket: str | None = None           # unix socket path (default: a fresh one under $TMPDIR)
    listen: tuple[str, int] | None = None   # TCP host, port
    timeout: float | None = None        # stop serving after this many seconds
    json: bool = False
    writable: bool = False              # copy-on-write layer outside the set
    insecure: bool = False              # TCP without TLS
    tls_certificates: str | None = None     # x509 dir: ca-cert.pem, server-cert.pem, server-key.pem
    threads: int = 1                    # nbdkit threads per connection
    key: KeySpec = field(default_factory=KeySpec)   # encrypted sets: where the secret is (never the secret)
    verbose: bool = False
    strict: bool = False


@dataclass(frozen=True)
class MountOptions:
    input: str
    mountpoint: str
    key: KeySpec = field(default_factory=KeySpec)
    verbose: bool = False
    strict: bool = False
