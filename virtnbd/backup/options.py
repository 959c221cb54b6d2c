"""The frozen record of what one backup run should do (built by cli/backup.py)."""
from __future__ import annotations

from dataclasses import dataclass, field

from virtnbd.backup.renew import Renew
from virtnbd.backupset.s3options import S3Options
from virtnbd.crypto.keysource import KeySpec
from virtnbd.rbdconn import CephOptions
from virtnbd.remote.options import RemoteOptions
from virtnbd.retention.policy import Policy
from virtnbd.virt.quiesceoptions import QuiesceOptions

LEVELS = ("copy", "full", "inc", "diff", "auto")
COMPRESS_METHODS = ("lz4", "zstd")


@dataclass(frozen=True)
class BackupOptions:
    domain: str
    level: str
    output: str
    uri: str | None = None
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    compress: bool = False
    compress_level: int | None = None
    compress_method: str = "lz4"
    workers: int = 0                       # disks in parallel; 0 = one per disk, at most 4
    scratchdir: str = "/var/tmp"
    socketfile: str | None = None
    printonly: bool = False
    threshold: int | None = None           # bytes; inc/diff skipped when fewer changed
    noprogress: bool = False
    verbose: bool = False
    strict: bool = False
    json: bool = False
    freeze: bool = True
    freeze_mountpoints: tuple[str, ...] = ()
    no_freeze: bool = False
    pause: bool = False
    agent_timeout: int = 10
    fallback_full: bool = False            # broken chain: move it to chain-<time>/ and start a new one
    umask: int | None = None               # None: files 0600, folders 0700
    push: bool = False                     # -t qcow2 --push: a libvirt push-mode job writes the images
    # tuning (not on the command line by default)
    read_size: int = 256 << 10             # bytes per NBD read request
    frame_size: int = 1 << 20              # bytes per data frame (one read buffer; several requests)
    connections: int = 2                   # NBD connections per disk (when the export allows multi-conn)
    depth: int = 32                        # read requests in flight per connection
    memory: int = 32 << 20                 # bytes of read buffers, shared by the disks copied in parallel
    staging: int = 16 << 20                # bytes of output staging blocks, shared the same way
    encode_threads: int = 0                # compression threads; 0: one per usable CPU, plus one
    ceph: CephOptions = field(default_factory=CephOptions)   # raw RBD disks: snapshots + diff for incrementals
    keep: Policy | None = None             # retention applied after a committed backup (virtnbdprune rules)
    merge: bool = False                    # ... consolidating points only kept points need
    renew: Renew | None = None             # -l auto: new chain after N incs / when the full is that old
    key: KeySpec = field(default_factory=KeySpec)           # encryption: names the secret's source, never holds it
    set_kind: str = "stream"               # kind of backup set: "stream" | "qcow2" (-t/--type)
    remote: RemoteOptions = field(default_factory=RemoteOptions)   # -U of another host: TLS, NBD address, ssh
    s3: S3Options | None = None                            # -o s3://: endpoint, profile, CA, timeouts (no secret)

    @property
    def buffer_size(self) -> int:
        """Bytes of one read buffer = the largest data frame."""
        return max(self.frame_size, self.read_size)

    @property
    def method(self) -> str | None:
        return self.compress_method if self.compress else None

    @property
    def quiesce(self) -> QuiesceOptions:
        return QuiesceOptions(freeze=self.freeze and not self.no_freeze and not self.pause,
                       mountpoints=self.freeze_mountpoints, pause=self.pause, timeout=self.agent_timeout)
