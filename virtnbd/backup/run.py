"""Orchestration of one backup run.

connect -> lock folder -> plan -> clean stale state -> quiesce + begin job ->
copy disks in parallel into partial files -> end job -> save side files ->
commit the point to the manifest. Any failure before the commit aborts the
job, removes partial/scratch/side files and the checkpoint this run created,
so the manifest's newest point stays the parent of the next inc.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import libvirt

from virtnbd import errors
from virtnbd.backup import consistency, modes, offline, output, push, recovery
from virtnbd.backup.diskrun import BackupRun, RunSummary, report, size_text
from virtnbd.backup.options import BackupOptions
from virtnbd.backup.plan import Plan, PlannedDisk, make_plan
from virtnbd.backupset import (
    encrypted,
    qcow2set,  # noqa: F401  (registers the qcow2 kind)
    s3options,
)
from virtnbd.backupset.api import BackupSet, create_set
from virtnbd.remote import host
from virtnbd.remote.host import Host
from virtnbd.remote.session import NO_TLS_WARNING, session
from virtnbd.source import rbdextents
from virtnbd.virt import agent, checkpoints, connection, domainxml, livebitmaps, xmlbuild
from virtnbd.virt.job import BackupJob, abort_stale, refuse_foreign_jobs
from virtnbd.virt.pushjob import PushJob

log = logging.getLogger(__name__)


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


def _refuse_busy(dom: libvirt.virDomain, plan: Plan, folder: str) -> None:
    """Abort a dead run's job of ours, refuse anyone else's: before the preflight, whose checkpoint queries
    would wait for libvirt's state lock behind a save/snapshot and misread the chain as broken."""
    abort_stale(dom, None if "://" in folder else Path(folder))      # push jobs write into local folders only
    refuse_foreign_jobs(dom, [pd.target for pd in plan.disks])


def _clean_stale(dom: libvirt.virDomain, plan: Plan, options: BackupOptions) -> None:
    for path in output.remove_stale_work_dirs(options.scratchdir):
        log.warning("removed scratch folder of a killed run: %s", path)
    if checkpoints.exists(dom, checkpoints.PENDING):       # a full that never committed (killed / lost libvirtd)
        checkpoints.delete(dom, checkpoints.PENDING)
        log.warning("removed checkpoint %s of a full that never committed", checkpoints.PENDING)
    if plan.level in ("inc", "diff"):
        removed = checkpoints.delete_newer_than(dom, plan.last_index)
        if removed:
            log.warning("removed checkpoint(s) %s of an earlier run that never completed (their changes "
                        "stay covered by %s)", ", ".join(removed), plan.parent)


def _job_checkpoint(plan: Plan, previous: list[str]) -> str | None:
    """The checkpoint the job creates: a full's is PENDING while the previous chain exists (renamed later)."""
    if plan.level == "full" and previous and plan.checkpoint and plan.bitmap_disks:
        return checkpoints.PENDING
    return plan.checkpoint


@contextlib.contextmanager
def _created_checkpoint(dom: libvirt.virDomain, name: str | None) -> Iterator[list[bool]]:
    """On failure, delete the checkpoint this run created (its bitmap merges into its parent's)."""
    committed = [False]
    try:
        yield committed
    except BaseException:
        if name and not committed[0]:
            _drop_checkpoint(dom, name)
        raise


def _drop_checkpoint(dom: libvirt.virDomain, name: str) -> None:
    """Delete a failed run's checkpoint; with libvirtd gone (noticed now or only by this call) leave it."""
    conn = dom.connect()
    if connection.alive(conn):
        try:
            if checkpoints.exists(dom, name):
                checkpoints.delete(dom, name)
                log.info("removed checkpoint %s of the failed run", name)
            return
        except errors.VirtnbdError as err:
            if connection.alive(conn):
                log.warning("could not remove checkpoint %s: %s (the next run removes it)", name, err)
                return
    log.warning("checkpoint %s of the failed run is left to the next run (no connection)", name)


def _switch_chain(dom: libvirt.virDomain, plan: Plan, previous: list[str], job_cp: str | None,
                  saved_cp: str | None) -> None:
    """After a full committed: delete the previous chain, give the pending checkpoint its real name.

    Until the commit the previous chain stays whole (docs/FAULTS.md): a full that
    fails at any earlier step leaves it continuable.
    """
    for name in reversed(previous):
        checkpoints.delete(dom, name)
    if previous:
        log.info("new chain: removed old checkpoints %s", ", ".join(previous))
    if job_cp != checkpoints.PENDING or not plan.checkpoint or saved_cp is None:
        return
    livebitmaps.rename(dom, checkpoints.PENDING, plan.checkpoint)
    checkpoints.delete_metadata(dom, checkpoints.PENDING)
    checkpoints.redefine(dom, saved_cp)


def _uses_bitmaps(plan: Plan) -> bool:
    """Some disk is read through a libvirt dirty bitmap (not whole, not by RBD diff)."""
    return any(pd.mode == "inc" for pd in plan.disks)


def _backup_xml(plan: Plan, socket: str | xmlbuild.TcpServer, workdir: str, skipped: list[str]) -> str:
    disks = [xmlbuild.BackupDisk(pd.target, f"{workdir}/{pd.target}.scratch.qcow2", full=pd.mode != "inc")
             for pd in plan.disks]
    return xmlbuild.backup_xml(socket, disks, skipped,
                               incremental=plan.incremental if _uses_bitmaps(plan) else None)


def _checkpoint_xml(plan: Plan, name: str | None, all_targets: list[str]) -> str | None:
    if not name or not plan.bitmap_disks:
        return None
    others = [t for t in all_targets if t not in plan.bitmap_disks]
    return xmlbuild.checkpoint_xml(name, plan.bitmap_disks, others)


def _saved_checkpoint(dom: libvirt.virDomain, plan: Plan, job_cp: str | None) -> str | None:
    """The new checkpoint's XML as the point keeps it (a pending one under the point's name, no parent)."""
    if not job_cp or not plan.checkpoint or not plan.bitmap_disks:
        return None
    xml = checkpoints.get_xml(dom, job_cp)
    return xml if job_cp == plan.checkpoint else xmlbuild.renamed_checkpoint_xml(xml, plan.checkpoint)


# -- entry point -------------------------------------------------------------------

def run(options: BackupOptions) -> RunSummary:
    started = time.monotonic()
    with modes.umask(options.umask), session(options.uri, options.remote) as (uri, on_host), \
            connection.connect(uri, options.remote.password_file) as conn:
        dom = connection.lookup_domain(conn, options.domain)
        if options.s3 is not None:
            s3options.configure(options.s3)
        bset = create_set(options.output, options.set_kind)
        with bset.lock():
            recovery.recover(bset.store)
            try:
                summary = _run_locked(options, dom, bset)
            except errors.LibvirtError:
                connection.check_alive(conn)        # say "libvirtd went away" rather than a socket error
                raise
            except libvirt.libvirtError as err:     # a libvirt call not wrapped where it is made
                connection.check_alive(conn)
                raise errors.LibvirtError(reason=connection.reason(err)) from err
            finally:
                bset.store.set_modes(options.umask)
        _remote_facts(summary, on_host)
    summary.seconds = round(time.monotonic() - started, 3)
    return summary


def _remote_facts(summary: RunSummary, on_host: Host) -> None:
    """A remote run's host, NBD addresses, TLS and ssh round trips in the summary; --no-tls as a note."""
    facts = on_host.facts()
    if facts is None:
        return
    summary.remote = dataclasses.asdict(facts)
    if not facts.tls:
        summary.notes.append(NO_TLS_WARNING)


def _offline() -> Any:
    return offline


def _run_locked(options: BackupOptions, dom: libvirt.virDomain, bset: BackupSet) -> RunSummary:
    name = dom.name()
    uuid = dom.UUIDString()
    folder = bset.location
    manifest = bset.manifest()
    domain_xml = connection.domain_xml(dom)
    all_disks = domainxml.parse_disks(domain_xml)
    plan = make_plan(options, manifest, all_disks, int(time.time()), folder=folder, domain=name, uuid=uuid)
    bset = encrypted.for_backup(bset, options.key, manifest, plan.level)     # before anything is written
    running = connection.is_running(dom)

    def replan(opts: BackupOptions, m: Any) -> Plan:
        return make_plan(opts, m, all_disks, int(time.time()), folder=folder, domain=name, uuid=uuid)

    if running:
        _refuse_busy(dom, plan, folder)
    verdict = consistency.preflight(options, dom, bset, manifest, plan, running=running, replan=replan)
    if verdict.manifest is not manifest and verdict.plan.level in ("copy", "full"):      # chain archived
        bset = encrypted.for_backup(create_set(options.output, options.set_kind), options.key, verdict.manifest,
                                    verdict.plan.level)
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
        summary.estimate = _estimate(dom, plan) if running else offline.estimate(options, plan)
        if options.printonly:
            for target, size in summary.estimate.items():
                log.info("%s: about %s to back up (%s)", target, size_text(size), plan.level)
            summary.skipped, summary.reason = True, "printonly"
            return summary
        changed = sum(summary.estimate.values())
        if plan.level in ("inc", "diff") and options.threshold is not None and changed < options.threshold:
            log.info("%s skipped: %s changed, below threshold %s", plan.level, size_text(changed),
                     size_text(options.threshold))
            summary.skipped, summary.reason = True, "below threshold"
            return summary
    with output.run_log(bset.store, plan.level, output.stamp()):
        log.info("backup of %s: level %s, point %s, disks %s", name, plan.level, plan.point,
                 ", ".join(pd.target for pd in plan.disks))
        if verdict.note:
            log.warning("%s", verdict.note)
            summary.notes.append(verdict.note)
        if not running and options.push:
            note = push.OFFLINE_NOTE.format(domain=name)
            log.warning("%s", note)
            summary.notes.append(note)
        if not running:
            log.info("domain %s is shut off: backing up its images read-only with qemu-nbd", name)
            return offline.execute(options, dom, bset, plan, domain_xml=domain_xml, uuid=uuid, summary=summary,
                                   all_targets=[d.target for d in all_disks])
        _clean_stale(dom, plan, options)
        return _execute(options, dom, bset, plan, domain_xml=domain_xml, uuid=uuid, summary=summary,
                        all_targets=[d.target for d in all_disks])


def _begin(job: Any, on_host: Host, push_xml: str | None, checkpoint_xml: str | None, *,
           pull_xml: Callable[[Any], str], workdir: Any, options: BackupOptions) -> Any:
    """Start the job: a push job writes its targets itself; a pull job's NBD server is placed by the host."""
    if push_xml:
        job.begin(push_xml, checkpoint_xml)
        return None
    return on_host.begin_job(lambda server: job.begin(pull_xml(server), checkpoint_xml), workdir, options.socketfile)


def _execute(options: BackupOptions, dom: libvirt.virDomain, bset: BackupSet, plan: Plan, *, domain_xml: str,
             uuid: str, summary: RunSummary, all_targets: list[str]) -> RunSummary:
    run_ = BackupRun(options, dom, bset, plan, domain_xml=domain_xml, uuid=uuid)
    side = run_.side_files()
    skipped = [t for t in all_targets if t not in {pd.target for pd in plan.disks}]
    previous = checkpoints.list_ours(dom) if plan.level == "full" else []
    job_cp = _job_checkpoint(plan, previous)
    checkpoint_xml = _checkpoint_xml(plan, job_cp, all_targets)
    pusher = push.PushRun(run_) if options.push else None
    try:
        on_host = host.current()
        if pusher and on_host.facts() is not None:
            raise errors.UsageError(reason="--push writes the images on the domain's host: use pull mode with -U")
        push_xml = pusher.prepare(skipped) if pusher else None       # before a full drops the old chain
        with on_host.work_dir(options.scratchdir, dom.name()) as workdir, \
                _created_checkpoint(dom, job_cp) as committed:
            with rbdextents.points(options.ceph, plan, committed, dom) as run_.rbd, \
                    (pusher.job() if pusher else BackupJob(dom)) as job, \
                    (pusher.reachable() if pusher else contextlib.nullcontext()):
                with _quiesced(dom, options) as quiesce:
                    rbdextents.snapshot(run_.rbd, plan)
                    socket = _begin(job, on_host, push_xml, checkpoint_xml, workdir=workdir, options=options,
                                    pull_xml=lambda server: _backup_xml(plan, server, workdir, skipped))
                summary.consistency = getattr(quiesce, "consistency", "crash")
                guest_info = dict(getattr(quiesce, "guest_info", {}) or {})
                results = pusher.finish(job) if isinstance(job, PushJob) and pusher else run_.copy_all(socket)
                saved_cp = _saved_checkpoint(dom, plan, job_cp)
                job.abort()
            saved = run_.save_side_files(side, saved_cp)
            point = run_.point(results, saved, summary.consistency, {
                "guest_info": guest_info, "libvirt_checkpoint": saved_cp is not None,
                "rbd_snapshots": [d.target for d in run_.rbd.disks] if run_.rbd else []})
            updated = bset.commit(point, dom.name(), uuid)
            committed[0] = True
    except BaseException:
        side.discard()
        run_.discard_images()
        raise
    if pusher:
        summary.push = {"job_seconds": round(pusher.job_seconds, 3), "hash_seconds": round(pusher.hash_seconds, 3)}
    if plan.level == "full":
        offline.switch_committed(plan, lambda: _switch_chain(dom, plan, previous, job_cp, saved_cp))
        if run_.rbd is not None:
            offline.switch_committed(plan, lambda: rbdextents.promote(options.ceph, plan, dom))
    return report(summary, plan, updated, results)
