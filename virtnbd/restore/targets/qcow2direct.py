"""qcow2 target written directly: data clusters with os.pwrite, metadata laid out at commit.

A restore always creates a FRESH qcow2 image without backing file, so the
format needs only its simplest form: every written guest cluster gets a host
cluster (assigned on first write, consecutive for a write spanning several
clusters, so a 1 MiB frame is one ``pwrite``), clusters never written stay
unallocated (they read as zeroes: the image is thin). At commit the L2 tables,
the L1 table, the refcount blocks and table are appended after the data and
the header is written last, then fsync and rename.

Measured faster than going through ``qemu-nbd`` (no socket copies, no extra
process; see /work/notes/restore.md). Options recorded at backup time are kept:
cluster size, compat (v2 0.10 / v3 1.1), lazy refcounts, compression type.
Images this writer cannot express (extended L2, refcount widths other than 16
bits, external data files, preallocation) go through :mod:`qcow2` (qemu-nbd).
"""
from __future__ import annotations

import logging
import os
import struct
from collections.abc import Mapping
from typing import Any

from virtnbd import errors
from virtnbd.fsutil import storage_error
from virtnbd.restore.targets.base import TargetRequest
from virtnbd.restore.targets.raw import FileTarget, pwrite_all

log = logging.getLogger(__name__)

MAGIC = b"QFI\xfb"
COPIED = 1 << 63
REFCOUNT_ORDER = 4                      # 16-bit refcounts
DEFAULT_CLUSTER = 64 << 10
INCOMPAT_COMPRESSION = 1 << 3
COMPAT_LAZY_REFCOUNTS = 1 << 0
COMPRESSION_TYPES = {"zlib": 0, "zstd": 1}


def settings(info: Mapping[str, Any], preallocate: bool) -> dict[str, Any] | None:
    """Image settings from the backup-time `qemu-img info`, or None when only qemu can create it."""
    if preallocate or info.get("format") not in (None, "qcow2"):
        return None if preallocate else _defaults()
    spec = info.get("format-specific") or {}
    data = (spec.get("data") or {}) if spec.get("type") == "qcow2" else {}
    if data.get("extended-l2") or data.get("data-file") or int(data.get("refcount-bits", 16)) != 16:
        return None
    cluster = int(info.get("cluster-size") or DEFAULT_CLUSTER)
    if cluster & (cluster - 1) or not 512 <= cluster <= 2 << 20:
        return None
    compat = str(data.get("compat") or "1.1")
    if compat not in ("0.10", "1.1"):
        return None
    compression = str(data.get("compression-type") or "zlib")
    if compression not in COMPRESSION_TYPES or (compat == "0.10" and compression != "zlib"):
        return None
    return {"cluster": cluster, "version": 2 if compat == "0.10" else 3,
            "lazy_refcounts": bool(data.get("lazy-refcounts")) and compat != "0.10", "compression": compression}


def _defaults() -> dict[str, Any]:
    return {"cluster": DEFAULT_CLUSTER, "version": 3, "lazy_refcounts": False, "compression": "zlib"}


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


class Qcow2DirectTarget(FileTarget):
    def __init__(self, request: TargetRequest, image: Mapping[str, Any]) -> None:
        super().__init__(request)
        self.cluster = int(image["cluster"])
        self.version = int(image["version"])
        self.lazy_refcounts = bool(image["lazy_refcounts"])
        self.compression = str(image["compression"])
        self.bits = self.cluster.bit_length() - 1
        self._l2: dict[int, bytearray] = {}     # L1 index -> L2 table (host offset | COPIED per guest cluster)
        self._data_clusters = 0
        self._next = 1                          # host cluster 0 is the header

    # -- data -------------------------------------------------------------------------
    def _host_runs(self, offset: int, length: int) -> list[tuple[int, int, int]]:
        """(guest offset, host offset, length) runs for a write, allocating clusters as needed."""
        c = self.cluster
        per = c // 8
        first, last = offset // c, (offset + length - 1) // c
        hosts = []
        with self._lock:
            for g in range(first, last + 1):
                table = self._l2.get(g // per)
                if table is None:
                    table = self._l2[g // per] = bytearray(c)
                (entry,) = struct.unpack_from(">Q", table, (g % per) * 8)
                if not entry:
                    entry = (self._next * c) | COPIED
                    struct.pack_into(">Q", table, (g % per) * 8, entry)
                    self._next += 1
                    self._data_clusters += 1
                hosts.append((entry & ~COPIED) // c)
        runs: list[tuple[int, int, int]] = []
        pos, end = offset, offset + length
        i = 0
        while pos < end:
            j = i
            while first + j + 1 <= last and hosts[j + 1] == hosts[j] + 1:
                j += 1
            run_end = min(end, (first + j + 1) * c)
            runs.append((pos, hosts[i] * c + pos - (first + i) * c, run_end - pos))
            pos = run_end
            i = j + 1
        return runs

    def write(self, offset: int, data: bytes | memoryview) -> None:
        fd = self._fd("write")
        if offset < 0 or offset + len(data) > self.virtual_size:
            raise errors.StorageError(path=self.tmp, reason=f"write {offset}+{len(data)} beyond the virtual size")
        if not len(data):
            return
        view = memoryview(data)
        try:
            for guest, host, length in self._host_runs(offset, len(view)):
                self._put(fd, view[guest - offset:guest - offset + length], host)
        except OSError as err:
            raise storage_error(self.tmp, err) from err
        self._count(written=len(view))

    def _put(self, fd: int, data: bytes | memoryview, pos: int) -> None:
        """Every write of the image (data and metadata) goes through here: the backup side's
        subclass hashes the bytes as they are written (``backup/qcow2write.py``)."""
        pwrite_all(fd, data, pos)

    # -- metadata ---------------------------------------------------------------------
    def _layout(self) -> tuple[bytes, dict[str, int], bytes, bytes, bytes, bytes]:
        c = self.cluster
        l2_entries = c // 8
        l1_size = max(1, _ceil(self.virtual_size, c * l2_entries))
        l2_tables = self._l2
        start = self._next                               # first metadata cluster after the data
        l2_at = {idx: start + n for n, idx in enumerate(sorted(l2_tables))}
        l1_at = start + len(l2_tables)
        l1_clusters = _ceil(l1_size * 8, c)
        rt_at = l1_at + l1_clusters
        per_block = c * 8 // (1 << REFCOUNT_ORDER)
        blocks = rt_clusters = 1
        while True:                                      # refcounts cover themselves: find the fixed point
            total = rt_at + rt_clusters + blocks
            need_blocks = _ceil(total, per_block)
            need_rt = _ceil(need_blocks * 8, c)
            if need_blocks == blocks and need_rt == rt_clusters:
                break
            blocks, rt_clusters = need_blocks, need_rt
        rb_at = rt_at + rt_clusters
        total = rb_at + blocks
        l1 = bytearray(l1_clusters * c)
        for idx, cl in l2_at.items():
            struct.pack_into(">Q", l1, idx * 8, (cl * c) | COPIED)
        refblocks = b"\x00\x01" * total + bytes(blocks * c - 2 * total)
        rtable = bytearray(rt_clusters * c)
        for n in range(blocks):
            struct.pack_into(">Q", rtable, n * 8, (rb_at + n) * c)
        l2_blob = b"".join(l2_tables[idx] for idx in sorted(l2_tables))
        places = {"l2": start, "l1": l1_at, "l1_size": l1_size, "rt": rt_at, "rt_clusters": rt_clusters,
                  "rb": rb_at, "total": total}
        return self._header(places), places, l2_blob, bytes(l1), bytes(rtable), refblocks

    def _header(self, p: Mapping[str, int]) -> bytes:
        c = self.cluster
        head = struct.pack(">4sIQIIQIIQQIIQ", MAGIC, self.version, 0, 0, self.bits, self.virtual_size, 0,
                           p["l1_size"], p["l1"] * c, p["rt"] * c, p["rt_clusters"], 0, 0)
        if self.version >= 3:
            incompat = INCOMPAT_COMPRESSION if self.compression != "zlib" else 0
            compat = COMPAT_LAZY_REFCOUNTS if self.lazy_refcounts else 0
            head += struct.pack(">QQQII", incompat, compat, 0, REFCOUNT_ORDER, 112)
            head += struct.pack(">B7x", COMPRESSION_TYPES[self.compression])
        return head + bytes(8)                           # header extension end marker

    def finish(self) -> None:
        """Metadata after the data, then the header: the file is a valid image only at the very end."""
        fd = self._fd("commit")
        c = self.cluster
        header, p, l2_blob, l1, rtable, refblocks = self._layout()
        self._put(fd, l2_blob, p["l2"] * c)
        self._put(fd, l1, p["l1"] * c)
        self._put(fd, rtable, p["rt"] * c)
        self._put(fd, refblocks, p["rb"] * c)
        os.ftruncate(fd, p["total"] * c)
        os.fsync(fd)
        self._put(fd, header, 0)
        log.debug("%s: %d data clusters", self.path, self._data_clusters)
