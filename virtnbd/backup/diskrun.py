"""The copy of one point's disks into the backup set: BackupRun (online; offline.py subclasses it).

Shared by ``run.py`` (online runs) and ``offline.py`` (shut-off domains), which
both import this module and never each other's.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import libvirt

from virtnbd import __version__, errors
from virtnbd.backup import copy, output, qcow2write
from virtnbd.backup.options import BackupOptions
from virtnbd.backup.plan import Plan, PlannedDisk, chain_points
from virtnbd.backupset import encrypted, outfile, qcow2set
from virtnbd.backupset import manifest as bsmanifest
from virtnbd.backupset.api import BackupSet
from virtnbd.source import rbdextents
from virtnbd.source.extents import BASE_ALLOCATION, iter_extents
from virtnbd.source.nbdsource import Address, NbdSource
from virtnbd.stream.format import StreamMeta
from virtnbd.stream.writer import StreamWriter
from virtnbd.virt import connection, domainxml, xmlbuild

log = logging.getLogger(__name__)

MAX_ENCODE_THREADS = 16     # frames in flight per disk (32 MiB / 1 MiB) keep more than this busy anyway


def encode_thread_count(requested: int) -> int:
    """Compression threads: ``requested``, or (0) one per CPU we may run on plus one
    to fill the gaps while the others wait for reads (2 CPUs, 1.5 GiB of text with
    lz4: 1.70 s -> 1.62 s). Frames in flight stay bounded by the read buffers."""
    if requested > 0:
        return requested
    return min(len(os.sched_getaffinity(0)), MAX_ENCODE_THREADS) + 1


@dataclass
class DiskResult:
    target: str
    entry: bsmanifest.DiskEntry
    bytes_read: int
    seconds: float


@dataclass
class RunSummary:
    domain: str
    level: str
    point: str | None
    skipped: bool = False
    reason: str = ""
    consistency: str = "unknown"
    disks: dict[str, dict[str, Any]] = field(default_factory=dict)
    bytes_read: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    points: list[str] = field(default_factory=list)
    estimate: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)     # chain repairs/restarts the user must know about
    push: dict[str, float] = field(default_factory=dict)   # --push: seconds of QEMU's job and of hashing
    remote: dict[str, Any] | None = None              # remote runs: host, nbd addresses, tls, ssh_round_trips

    def as_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).astimezone().isoformat(timespec="seconds")


def _bitmap_for(pd: PlannedDisk) -> str | None:
    return xmlbuild.bitmap_context(pd.target) if pd.mode == "inc" else None


class _Progress:
    """tqdm bar per disk on a TTY, nothing otherwise."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self.lock = threading.Lock()
        self.position = 0

    def bar(self, target: str, total: int) -> tuple[Callable[[int], None] | None, Callable[[], None]]:
        if not self.enabled:
            return None, lambda: None
        from tqdm import tqdm
        with self.lock:
            position = self.position
            self.position += 1
        bar = tqdm(total=total, desc=target, unit="B", unit_scale=True, unit_divisor=1024,
                   position=position, leave=False, file=sys.stderr)

        def update(n: int) -> None:
            bar.update(n)

        return update, bar.close


class BackupRun:
    def __init__(self, options: BackupOptions, dom: libvirt.virDomain, bset: BackupSet, plan: Plan, *,
                 domain_xml: str, uuid: str) -> None:
        self.options = options
        self.dom = dom
        self.bset = bset
        self.plan = plan
        self.domain_xml = domain_xml
        self.uuid = uuid
        self.cancel = threading.Event()
        self.progress = _Progress(not options.noprogress)
        self.time = _now_iso()
        self.rbd: rbdextents.RbdTracker | None = None     # raw RBD disks (set by _execute)
        self.images: list[qcow2set.PreparedImage] = []    # qcow2 set: this run's images, until the commit

    # -- one disk -----------------------------------------------------------------
    def bitmap_for(self, pd: PlannedDisk) -> str | None:
        """NBD context of the disk's dirty bitmap (offline runs read a persistent one)."""
        return _bitmap_for(pd)

    def copy_one(self, pd: PlannedDisk, socket: Address, pool: ThreadPoolExecutor) -> DiskResult:
        opts = self.options
        started = time.monotonic()
        bitmap = self.bitmap_for(pd)
        contexts = (BASE_ALLOCATION, bitmap) if bitmap else (BASE_ALLOCATION,)
        with NbdSource(socket, xmlbuild.export_name(pd.target), contexts, connections=opts.connections,
                       depth=opts.depth, buffers=self.buffers_per_disk(),
                       buffer_size=opts.buffer_size, request_size=opts.read_size) as src:
            update, close = self.progress.bar(pd.target, src.size)
            try:
                if self.bset.kind == qcow2set.KIND:
                    image, done = self._copy_image(pd, src, bitmap, pool, update)
                else:
                    meta, totals, stats = self._copy_stream(pd, src, bitmap, pool, update)
            finally:
                close()
            bytes_read = src.counters.bytes_read
        extra = {"bytes_read": bytes_read, "mode": pd.mode, "read_zero_bytes": 0,
                 "bus": pd.disk.bus, "source": pd.disk.path or pd.disk.name or ""}
        if self.bset.kind == qcow2set.KIND:
            extra["read_zero_bytes"] = done.read_zero_bytes
            entry = self._finish_image(image, done, extra)
        else:
            extra["read_zero_bytes"] = stats.read_zero_bytes
            entry = bsmanifest.disk_entry(meta, self.bset.data_name(pd.target, self.plan.level, self.plan.point),
                                          totals, extra)
        seconds = time.monotonic() - started
        log.info("%s: %s data, %s zero, %s stored, %s read in %.1fs", pd.target, size_text(entry.data_bytes),
                 size_text(entry.zero_bytes), size_text(entry.stored_bytes), size_text(bytes_read), seconds)
        return DiskResult(pd.target, entry, bytes_read, seconds)

    def _extents(self, pd: PlannedDisk, src: NbdSource, bitmap: str | None) -> Any:
        status, dirty = rbdextents.status_for(self.rbd, pd, self.plan.parent, src.block_status, bitmap)
        return iter_extents(status, src.size, dirty, export=pd.target)

    def _copy_stream(self, pd: PlannedDisk, src: NbdSource, bitmap: str | None, pool: ThreadPoolExecutor,
                     update: Callable[[int], None] | None) -> tuple[StreamMeta, Any, copy.CopyStats]:
        opts, plan = self.options, self.plan
        name = self.bset.data_name(pd.target, plan.level, plan.point)
        extra = {"whole_disk": pd.mode == "full", "reason": pd.reason} if plan.level in ("inc", "diff") else {}
        meta = StreamMeta(virtual_size=src.size, disk=pd.target, disk_format=pd.disk.format, level=plan.level,
                          checkpoint=plan.checkpoint, parent=plan.parent if plan.level in ("inc", "diff") else None,
                          time=self.time, compression=opts.method, tool_version=__version__,
                          extra=MappingProxyType(extra))
        meta, stages = self.bset.writing(meta, name)     # encrypted set: sealed in the encode workers
        with self.bset.create_data(name, self.staging_blocks_per_disk()) as out:
            writer = StreamWriter(out, meta, path=self.bset.store.describe(name),
                                  level=opts.compress_level, stages=stages)
            stats = copy.copy_disk(src, writer, self._extents(pd, src, bitmap), pool, read_size=opts.buffer_size,
                                   progress=update, cancel=self.cancel)
            totals = writer.finish()
        return meta, totals, stats

    def _copy_image(self, pd: PlannedDisk, src: NbdSource, bitmap: str | None, pool: ThreadPoolExecutor,
                    update: Callable[[int], None] | None) -> tuple[qcow2set.PreparedImage, copy.CopyStats]:
        """qcow2 set: the point's image prepared (overlay on the parent's image for a disk read by its
        bitmap, standalone otherwise), then filled by the same copy loop."""
        plan = self.plan
        relative = plan.level in ("inc", "diff")
        changes_only = relative and pd.mode != "full"         # dirty bitmap or RBD diff: an overlay
        manifest = self.bset.manifest()
        parents = chain_points(manifest)                      # inc and diff stack on the newest full/inc point
        backing = qcow2set.backing_image(manifest, parents[-1].name, pd.target) if changes_only and parents else None
        if changes_only and backing is None:
            raise errors.BackupSetError(path=self.bset.location, reason=f"{pd.target}: no image at the parent point "
                                        "to stack the changes on; start a new chain (-l full)")
        image = qcow2set.prepare_image(self.bset, disk=pd.target, point=plan.point, level=plan.level,
                                       virtual_size=src.size, backing=backing, checkpoint=plan.checkpoint,
                                       parent=plan.parent if relative else None, disk_format=pd.disk.format,
                                       create=backing is not None)
        self.images.append(image)
        return qcow2write.copy_into_image(src, image, self._extents(pd, src, bitmap), pool,
                                          read_size=self.options.buffer_size, progress=update, cancel=self.cancel)

    def _finish_image(self, image: qcow2set.PreparedImage, done: copy.CopyStats,
                      extra: dict[str, Any]) -> bsmanifest.DiskEntry:
        started = time.monotonic()
        entry = qcow2set.finish_image(self.bset, image, data_bytes=done.data_bytes, zero_bytes=done.zero_bytes,
                                      extra=extra)
        log.debug("%s: integrity records of %s in %.2fs", image.disk, image.name, time.monotonic() - started)
        return entry

    def discard_images(self) -> None:
        """A run that does not commit: its prepared or finished images go (no point lists them)."""
        for image in self.images:
            qcow2set.discard_image(self.bset, image)
        self.images.clear()

    def workers(self) -> int:
        return max(1, self.options.workers or min(len(self.plan.disks), 4))

    def parallel_disks(self) -> int:
        return max(1, min(self.workers(), len(self.plan.disks)))

    def buffers_per_disk(self) -> int:
        """Read buffers per disk: the memory budget split over the disks copied at once."""
        return max(4, self.options.memory // self.parallel_disks() // self.options.buffer_size)

    def staging_blocks_per_disk(self) -> int:
        """Output staging blocks per disk: that budget split the same way."""
        return max(3, self.options.staging // self.parallel_disks() // outfile.BLOCK)

    # -- all disks ----------------------------------------------------------------
    def copy_all(self, socket: Address) -> list[DiskResult]:
        opts = self.options
        disks = self.plan.disks
        workers = self.workers()
        encode_threads = encode_thread_count(opts.encode_threads)
        with ThreadPoolExecutor(encode_threads, thread_name_prefix="encode") as pool, \
                ThreadPoolExecutor(workers, thread_name_prefix="disk") as disk_pool:
            futures = [disk_pool.submit(self.copy_one, pd, socket, pool) for pd in disks]
            try:
                while True:
                    done, pending = wait(futures, timeout=0.5, return_when=FIRST_EXCEPTION)
                    connection.check_alive(self.dom.connect())
                    failed = [f for f in done if f.exception() is not None]
                    if failed:
                        raise failed[0].exception()  # type: ignore[misc]
                    if not pending:
                        break
            except BaseException:
                self.cancel.set()
                raise
            finally:
                if self.cancel.is_set():
                    _drain(futures)
            return [f.result() for f in futures]

    # -- the manifest record ------------------------------------------------------
    def point(self, results: list[DiskResult], saved: dict[str, Any], consistency: str,
              extra: dict[str, Any]) -> bsmanifest.Point:
        """The point to commit (online and offline runs); ``extra`` adds run-type facts."""
        plan = self.plan
        return bsmanifest.Point(
            name=plan.point, level=plan.level, parent=plan.parent if plan.level in ("inc", "diff") else None,
            checkpoint=plan.checkpoint, time=self.time, disks=MappingProxyType({r.target: r.entry for r in results}),
            domain_xml=saved["domain_xml"], checkpoint_xml=saved.get("checkpoint_xml"), consistency=consistency,
            extra=MappingProxyType(self.bset.point_extra({
                "qemu_img_info": saved["qemu_img_info"], "boot_files": saved["boot_files"],
                "tool_version": __version__, "skipped_disks": dict(plan.skipped),
                "bytes_read": sum(r.bytes_read for r in results), **extra})))

    def side_files(self) -> output.SideFiles:
        """Where this point's side files go (sealed by an encrypted set)."""
        sealed = encrypted.is_encrypted(self.bset)
        return output.SideFiles(self.bset.store, self.bset.seal_side if sealed else None)

    # -- side files ---------------------------------------------------------------
    def save_side_files(self, side: output.SideFiles, checkpoint_xml: str | None) -> dict[str, Any]:
        point = self.plan.point
        saved: dict[str, Any] = {}
        saved["domain_xml"] = side.save(f"vmconfig.{point}.xml", self.domain_xml.encode())
        if checkpoint_xml is not None and self.plan.checkpoint:
            saved["checkpoint_xml"] = side.save(f"{output.CHECKPOINT_DIR}/{self.plan.checkpoint}.xml",
                                                checkpoint_xml.encode())
        images = {}
        for pd in self.plan.disks:
            if pd.disk.format == "qcow2" and pd.disk.path and pd.disk.source_type in ("file", "block"):
                info = output.qemu_img_info(pd.disk.path)
                if info is not None:
                    images[pd.target] = side.save(f"{pd.target}.{point}.qemu-img.json",
                                                  _json_bytes(info))
        saved["qemu_img_info"] = images
        boot = domainxml.parse_boot_files(self.domain_xml).present()
        files = {}
        for kind, path in boot.items():
            base = Path(path).name
            if kind == "tpm_state":
                copied = side.copy_tree(f"tpm.{point}", path)
            elif kind == "loader":
                copied = side.copy_file(f"loader.{point}.{base}", path)
            else:
                copied = side.copy_file(f"{kind}.{point}.{base}", path)
            if copied:
                files[kind] = copied
        saved["boot_files"] = files
        return saved


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


def _drain(futures: list[Future[DiskResult]]) -> None:
    for fut in futures:
        with contextlib.suppress(BaseException):
            fut.result()


def size_text(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{n} B"
        value /= 1024
    return f"{n} B"


def report(summary: RunSummary, plan: Plan, updated: bsmanifest.Manifest, results: list[DiskResult]) -> RunSummary:
    """Fill the summary of a committed point (online and offline runs)."""
    summary.points = [p.name for p in updated.points]
    for r in results:
        summary.disks[r.target] = {"file": r.entry.file, "bytes_read": r.bytes_read,
                                   "data_bytes": r.entry.data_bytes, "zero_bytes": r.entry.zero_bytes,
                                   "stored_bytes": r.entry.stored_bytes, "seconds": round(r.seconds, 3)}
    summary.bytes_read = sum(r.bytes_read for r in results)
    summary.bytes_written = sum(r.entry.stored_bytes for r in results)
    log.info("point %s committed (%s read, %s written, consistency %s)", plan.point, size_text(summary.bytes_read),
             size_text(summary.bytes_written), summary.consistency)
    return summary
