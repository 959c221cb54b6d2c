"""Orchestration of one backup run.

connect -> lock folder -> plan -> clean stale state -> quiesce + begin job ->
copy disks in parallel into partial files -> end job -> save side files ->
commit the point to the manifest. Any failure before the commit aborts the
job, removes partial/scratch/side files and the checkpoint this run created,
so the manifest's newest point stays the parent of the next inc.
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
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import libvirt

from virtnbd import __version__, errors, rbdextents
from virtnbd.backup import consistency, copy, modes, output, recovery
from virtnbd.backup.options import BackupOptions
from virtnbd.backup.plan import Plan, PlannedDisk, make_plan
from virtnbd.backupset import encrypted, outfile
from virtnbd.backupset import manifest as bsmanifest
from virtnbd.backupset.api import BackupSet, create_set
from virtnbd.extents import BASE_ALLOCATION, iter_extents
from virtnbd.nbdsource import NbdSource
from virtnbd.stream.format import StreamMeta
from virtnbd.stream.writer import StreamWriter
from virtnbd.virt import agent, checkpoints, connection, domainxml, xmlbuild
from virtnbd.virt.job import BackupJob, abort_stale

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
        self.folder = Path(bset.location)     # side files (output.SideFiles) are still written locally
        self.plan = plan
        self.domain_xml = domain_xml
        self.uuid = uuid
        self.cancel = threading.Event()
        self.progress = _Progress(not options.noprogress)
        self.time = _now_iso()
        self.rbd: rbdextents.RbdTracker | None = None     # raw RBD disks (set by _execute)

    # -- one disk -----------------------------------------------------------------
    def bitmap_for(self, pd: PlannedDisk) -> str | None:
        """NBD context of the disk's dirty bitmap (offline runs read a persistent one)."""
        return _bitmap_for(pd)

    def copy_one(self, pd: PlannedDisk, socket: str, pool: ThreadPoolExecutor) -> DiskResult:
        opts, plan = self.options, self.plan
        started = time.monotonic()
        bitmap = self.bitmap_for(pd)
        contexts = (BASE_ALLOCATION, bitmap) if bitmap else (BASE_ALLOCATION,)
        name = self.bset.data_name(pd.target, plan.level, plan.point)
        with NbdSource(socket, xmlbuild.export_name(pd.target), contexts, connections=opts.connections,
                       depth=opts.depth, buffers=self.buffers_per_disk(),
                       buffer_size=opts.buffer_size, request_size=opts.read_size) as src:
            extra = {"whole_disk": pd.mode == "full", "reason": pd.reason} if plan.level in ("inc", "diff") else {}
            meta = StreamMeta(virtual_size=src.size, disk=pd.target, disk_format=pd.disk.format, level=plan.level,
                              checkpoint=plan.checkpoint, parent=plan.parent if plan.level in ("inc", "diff") else None,
                              time=self.time, compression=opts.method, tool_version=__version__,
                              extra=MappingProxyType(extra))
            update, close = self.progress.bar(pd.target, src.size)
            try:
                meta, stages = self.bset.writing(meta, name)     # encrypted set: sealed in the encode workers
                with self.bset.create_data(name, self.staging_blocks_per_disk()) as out:
                    writer = StreamWriter(out, meta, path=self.bset.store.describe(name),
                                          level=opts.compress_level, stages=stages)
                    status, dirty = rbdextents.status_for(self.rbd, pd, plan.parent, src.block_status, bitmap)
                    extents = iter_extents(status, src.size, dirty, export=pd.target)
                    stats = copy.copy_disk(src, writer, extents, pool, read_size=opts.buffer_size,
                                           progress=update, cancel=self.cancel)
                    totals = writer.finish()
            finally:
                close()
            bytes_read = src.counters.bytes_read
        entry = bsmanifest.disk_entry(meta, name, totals, {
            "bytes_read": bytes_read, "mode": pd.mode, "read_zero_bytes": stats.read_zero_bytes,
            "bus": pd.disk.bus, "source": pd.disk.path or pd.disk.name or ""})
        seconds = time.monotonic() - started
        log.info("%s: %s data, %s zero, %s stored, %s read in %.1fs", pd.target, _size(totals.data_bytes),
                 _size(totals.zero_bytes), _size(totals.stored_bytes), _size(bytes_read), seconds)
        return DiskResult(pd.target, entry, bytes_read, seconds)

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
    def copy_all(self, socket: str) -> list[DiskResult]:
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
        sealed = isinstance(self.bset, encrypted.EncryptedSet)
        return output.SideFiles(self.folder, self.bset.seal_side if sealed else None)

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
                copied = side.copy_tree(f"tpm.{point}", path) if Path(path).is_dir() else None
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


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{n} B"
        value /= 1024
    return f"{n} B"


# -- helpers used before the job ------------------------------------------------

def _quiesced(dom: libvirt.virDomain, options: BackupOptions) -> contextlib.AbstractContextManager[Any]:
    """The guest agent's freeze/thaw (or pause) around the job start."""
    return agent.quiesced(dom, options.quiesce)


def _estimate(dom: libvirt.virDomain, plan: Plan) -> dict[str, int]:
    if plan.parent and plan.level in ("inc", "diff"):
        sizes = checkpoints.dirty_sizes(dom, plan.parent)
        estimate = {}
        for pd in plan.disks:
            if pd.mode == "inc":
                estimate[pd.target] = sizes.get(pd.target, 0)
            else:
                estimate[pd.target] = _allocation(dom, pd)
        return estimate
    return {pd.target: _allocation(dom, pd) for pd in plan.disks}


def _allocation(dom: libvirt.virDomain, pd: PlannedDisk) -> int:
    try:
        _capacity, allocation, _physical = dom.blockInfo(pd.target)
    except libvirt.libvirtError:
        return 0
    return int(allocation)


def _check_parent(dom: libvirt.virDomain, plan: Plan) -> None:
    if plan.parent and _uses_bitmaps(plan) and not checkpoints.exists(dom, plan.parent):
        raise errors.CheckpointError(
            checkpoint=plan.parent,
            reason=f"the parent of this {plan.level} is missing in libvirt for domain {dom.name()}; "
                   f"start a new chain with -l full into a new folder")


def _clean_stale(dom: libvirt.virDomain, plan: Plan, options: BackupOptions) -> None:
    abort_stale(dom)
    for path in output.remove_stale_work_dirs(options.scratchdir):
        log.warning("removed scratch folder of a killed run: %s", path)
    if plan.level == "full":
        removed = checkpoints.delete_ours(dom)
        if removed:
            log.info("new chain: removed old checkpoints %s", ", ".join(removed))
    elif plan.level in ("inc", "diff"):
        removed = checkpoints.delete_newer_than(dom, plan.last_index)
        if removed:
            log.warning("removed checkpoint(s) %s of an earlier run that never completed (their changes "
                        "stay covered by %s)", ", ".join(removed), plan.parent)


@contextlib.contextmanager
def _created_checkpoint(dom: libvirt.virDomain, plan: Plan) -> Iterator[list[bool]]:
    """On failure, delete the checkpoint this run created (its bitmap merges into the parent)."""
    committed = [False]
    try:
        yield committed
    except BaseException:
        if plan.checkpoint and not committed[0]:
            try:
                if checkpoints.exists(dom, plan.checkpoint):
                    checkpoints.delete(dom, plan.checkpoint)
                    log.info("removed checkpoint %s of the failed run", plan.checkpoint)
            except errors.VirtnbdError as err:
                log.warning("could not remove checkpoint %s: %s (the next run removes it)", plan.checkpoint, err)
        raise


def _uses_bitmaps(plan: Plan) -> bool:
    """Some disk is read through a libvirt dirty bitmap (not whole, not by RBD diff)."""
    return any(pd.mode == "inc" for pd in plan.disks)


def _backup_xml(plan: Plan, socket: str, workdir: Path, skipped: list[str]) -> str:
    disks = [xmlbuild.BackupDisk(pd.target, str(workdir / f"{pd.target}.scratch.qcow2"), full=pd.mode != "inc")
             for pd in plan.disks]
    return xmlbuild.backup_xml(socket, disks, skipped,
                               incremental=plan.incremental if _uses_bitmaps(plan) else None)


def _checkpoint_xml(plan: Plan, all_targets: list[str]) -> str | None:
    if not plan.checkpoint or not plan.bitmap_disks:
        return None
    others = [t for t in all_targets if t not in plan.bitmap_disks]
    return xmlbuild.checkpoint_xml(plan.checkpoint, plan.bitmap_disks, others)


# -- entry point -------------------------------------------------------------------

def run(options: BackupOptions) -> RunSummary:
    started = time.monotonic()
    with modes.umask(options.umask), connection.connect(options.uri) as conn:
        dom = connection.lookup_domain(conn, options.domain)
        bset = create_set(options.output)
        folder = Path(bset.location)   # recovery and modes still work on the local folder
        with bset.lock():
            recovery.recover(folder)
            try:
                summary = _run_locked(options, dom, bset)
            finally:
                modes.apply(folder, options.umask)
    summary.seconds = round(time.monotonic() - started, 3)
    return summary


def _offline() -> Any:
    from virtnbd.backup import offline  # imports this module: load it only when needed
    return offline


def _run_locked(options: BackupOptions, dom: libvirt.virDomain, bset: BackupSet) -> RunSummary:
    name = dom.name()
    uuid = dom.UUIDString()
    folder = Path(bset.location)
    manifest = bset.manifest()
    domain_xml = connection.domain_xml(dom)
    all_disks = domainxml.parse_disks(domain_xml)
    plan = make_plan(options, manifest, all_disks, int(time.time()), folder=str(folder), domain=name, uuid=uuid)
    bset = encrypted.for_backup(bset, options.key, manifest, plan.level)     # before anything is written
    running = connection.is_running(dom)

    def replan(opts: BackupOptions, m: Any) -> Plan:
        return make_plan(opts, m, all_disks, int(time.time()), folder=str(folder), domain=name, uuid=uuid)

    verdict = consistency.preflight(options, dom, folder, manifest, plan, running=running, replan=replan)
    if verdict.manifest is not manifest and verdict.plan.level in ("copy", "full"):      # chain archived
        bset = encrypted.for_backup(create_set(options.output), options.key, verdict.manifest, verdict.plan.level)
    plan, manifest = verdict.plan, verdict.manifest
    summary = RunSummary(domain=name, level=plan.level, point=plan.point,
                         points=[p.name for p in manifest.points] if manifest else [])
    for target, why in plan.skipped:
        log.info("%s: skipped (%s)", target, why)
    for pd in plan.disks:
        if pd.reason:
            log.warning("%s: backed up whole in this %s: %s", pd.target, plan.level, pd.reason)
    if plan.level in ("inc", "diff"):
        _check_parent(dom, plan)
    if options.printonly or options.threshold is not None:
        summary.estimate = _estimate(dom, plan) if running else _offline().estimate(options, plan)
        if options.printonly:
            for target, size in summary.estimate.items():
                log.info("%s: about %s to back up (%s)", target, _size(size), plan.level)
            summary.skipped, summary.reason = True, "printonly"
            return summary
        changed = sum(summary.estimate.values())
        if plan.level in ("inc", "diff") and options.threshold is not None and changed < options.threshold:
            log.info("%s skipped: %s changed, below threshold %s", plan.level, _size(changed),
                     _size(options.threshold))
            summary.skipped, summary.reason = True, "below threshold"
            return summary
    with output.run_log(folder, plan.level, output.stamp()):
        log.info("backup of %s: level %s, point %s, disks %s", name, plan.level, plan.point,
                 ", ".join(pd.target for pd in plan.disks))
        if verdict.note:
            log.warning("%s", verdict.note)
            summary.notes.append(verdict.note)
        if not running:
            log.info("domain %s is shut off: backing up its images read-only with qemu-nbd", name)
            return _offline().execute(options, dom, bset, plan, domain_xml=domain_xml, uuid=uuid, summary=summary,
                                   all_targets=[d.target for d in all_disks])
        _clean_stale(dom, plan, options)
        return _execute(options, dom, bset, plan, domain_xml=domain_xml, uuid=uuid, summary=summary,
                        all_targets=[d.target for d in all_disks])


def _execute(options: BackupOptions, dom: libvirt.virDomain, bset: BackupSet, plan: Plan, *, domain_xml: str,
             uuid: str, summary: RunSummary, all_targets: list[str]) -> RunSummary:
    run_ = BackupRun(options, dom, bset, plan, domain_xml=domain_xml, uuid=uuid)
    side = run_.side_files()
    skipped = [t for t in all_targets if t not in {pd.target for pd in plan.disks}]
    checkpoint_xml = _checkpoint_xml(plan, all_targets)
    try:
        with output.work_dir(options.scratchdir) as workdir, _created_checkpoint(dom, plan) as committed:
            socket = options.socketfile or str(workdir / "backup.sock")
            with rbdextents.points(options.ceph, plan, committed, dom) as run_.rbd, BackupJob(dom) as job:
                with _quiesced(dom, options) as quiesce:
                    rbdextents.snapshot(run_.rbd, plan)
                    job.begin(_backup_xml(plan, socket, workdir, skipped), checkpoint_xml)
                summary.consistency = getattr(quiesce, "consistency", "crash")
                guest_info = dict(getattr(quiesce, "guest_info", {}) or {})
                results = run_.copy_all(socket)
                saved_cp = checkpoints.get_xml(dom, plan.checkpoint) if plan.checkpoint and plan.bitmap_disks else None
                job.abort()
            saved = run_.save_side_files(side, saved_cp)
            point = run_.point(results, saved, summary.consistency, {
                "guest_info": guest_info, "libvirt_checkpoint": saved_cp is not None,
                "rbd_snapshots": [d.target for d in run_.rbd.disks] if run_.rbd else []})
            updated = bset.commit(point, dom.name(), uuid)
            committed[0] = True
    except BaseException:
        side.discard()
        raise
    return report(summary, plan, updated, results)


def report(summary: RunSummary, plan: Plan, updated: bsmanifest.Manifest, results: list[DiskResult]) -> RunSummary:
    """Fill the summary of a committed point (online and offline runs)."""
    summary.points = [p.name for p in updated.points]
    for r in results:
        summary.disks[r.target] = {"file": r.entry.file, "bytes_read": r.bytes_read,
                                   "data_bytes": r.entry.data_bytes, "zero_bytes": r.entry.zero_bytes,
                                   "stored_bytes": r.entry.stored_bytes, "seconds": round(r.seconds, 3)}
    summary.bytes_read = sum(r.bytes_read for r in results)
    summary.bytes_written = sum(r.entry.stored_bytes for r in results)
    log.info("point %s committed (%s read, %s written, consistency %s)", plan.point, _size(summary.bytes_read),
             _size(summary.bytes_written), summary.consistency)
    return summary
