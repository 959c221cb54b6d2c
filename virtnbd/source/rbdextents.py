"""Incremental backups of raw RBD disks: RBD's own change tracking instead of a QEMU dirty bitmap.

A raw image cannot carry a persistent bitmap, so libvirt checkpoints cannot
track an RBD disk with ``<driver type='raw'>``. Instead every full/inc point
keeps an RBD snapshot of the image named after the point's checkpoint
(``virtnbdbackup.N``), and an inc/diff reads the extents that changed since the
parent point's snapshot (``Image.diff_iterate``, what ``rbd diff --from-snap``
prints).

Timing, so that nothing is ever missed: the snapshot of point N is taken
*before* the backup job starts (inside the freeze/pause window when there is
one), and the changed extents of point N are asked *after* the job started,
on the live image. So the diff covers every write between the previous
point's job start and this one's (a superset: writes after the job started are
included too, harmlessly), and the bytes are read from the job's NBD export,
which shows the disk exactly as it was when the job started. Data and zero are
told apart by the export's ``base:allocation``, as for bitmap incrementals.

The engine hook: the changed extents are presented to :func:`virtnbd.source.extents.iter_extents`
as one more block-status context (:data:`DIRTY_CONTEXT`) next to ``base:allocation``.
"""
from __future__ import annotations

import bisect
import contextlib
import dataclasses
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from virtnbd import errors, rbdconn
from virtnbd.backupset import naming
from virtnbd.source.extents import STATE_DIRTY, StatusFn

log = logging.getLogger(__name__)

DIRTY_CONTEXT = "virtnbd:rbd-diff"
MODE = "rbd"                 # PlannedDisk.mode of a raw RBD disk read by RBD diff in an inc/diff
PENDING = "virtnbdbackup.pending"   # a full's snapshot until its point commits (then renamed to .0)


def image_of(disk: Any) -> rbdconn.ImageSpec | None:
    """The RBD image behind a domain disk (``virtnbd.virt.domainxml.Disk``), or None."""
    if getattr(disk, "source_type", None) != "network" or getattr(disk, "protocol", None) != "rbd":
        return None
    name = getattr(disk, "name", None) or ""
    if "@" in name:                       # a disk on a snapshot is read-only: nothing to track
        return None
    pool, sep, image = name.partition("/")
    if not sep or not pool or not image or "/" in image:     # namespaces are not supported here
        return None
    return rbdconn.ImageSpec(pool, image)


def tracked(disk: Any) -> bool:
    """A raw RBD disk: incrementals come from RBD snapshots + diff (qcow2 ones carry a QEMU bitmap)."""
    return getattr(disk, "format", None) == "raw" and image_of(disk) is not None


def merge(ranges: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, non-overlapping, non-adjacent ``(offset, length)`` ranges."""
    out: list[tuple[int, int]] = []
    for off, length in sorted(r for r in ranges if r[1] > 0):
        if out and off <= out[-1][0] + out[-1][1]:
            last_off, last_len = out[-1]
            out[-1] = (last_off, max(last_len, off + length - last_off))
        else:
            out.append((off, length))
    return out


def dirty_runs(changed: Sequence[tuple[int, int]], offset: int, count: int) -> list[tuple[int, int]]:
    """NBD-style ``[(length, flags), ...]`` for ``[offset, offset + count)`` from merged changed ranges."""
    end = offset + count
    runs: list[tuple[int, int]] = []
    pos = offset
    i = max(0, bisect.bisect_right([c[0] for c in changed], offset) - 1)
    while pos < end:
        while i < len(changed) and changed[i][0] + changed[i][1] <= pos:
            i += 1
        if i < len(changed) and changed[i][0] <= pos:
            nxt, flags = min(end, changed[i][0] + changed[i][1]), STATE_DIRTY
        else:
            nxt, flags = (min(end, changed[i][0]) if i < len(changed) else end), 0
        runs.append((nxt - pos, flags))
        pos = nxt
    return runs


def with_dirty_context(status: StatusFn, changed: Sequence[tuple[int, int]]) -> StatusFn:
    """``status`` plus :data:`DIRTY_CONTEXT` answered from ``changed`` (merged ranges)."""

    def answer(offset: int, count: int) -> Mapping[str, Sequence[tuple[int, int]]]:
        result = dict(status(offset, count))
        result[DIRTY_CONTEXT] = dirty_runs(changed, offset, count)
        return result

    return answer


@dataclass(frozen=True)
class RbdDisk:
    target: str
    spec: rbdconn.ImageSpec


class RbdTracker:
    """Snapshots and diffs of the RBD images of one backup run (one cluster connection)."""

    def __init__(self, options: rbdconn.CephOptions, disks: Sequence[RbdDisk]) -> None:
        import rbd

        self._rbd = rbd
        self.options = options
        self.disks = tuple(disks)
        self.created: list[tuple[RbdDisk, str]] = []
        self._stack = contextlib.ExitStack()
        self._ioctxs: dict[str, Any] = {}
        try:
            self._cluster = self._stack.enter_context(rbdconn.connect(options))
        except BaseException:
            self._stack.close()
            raise

    def __enter__(self) -> RbdTracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def _ioctx(self, pool: str) -> Any:
        if pool not in self._ioctxs:
            self._ioctxs[pool] = self._stack.enter_context(rbdconn.open_pool(self._cluster, pool, self.options))
        return self._ioctxs[pool]

    @contextlib.contextmanager
    def _image(self, disk: RbdDisk, snapshot: str | None = None, read_only: bool = True) -> Iterator[Any]:
        try:
            image = self._rbd.Image(self._ioctx(disk.spec.pool), disk.spec.image, snapshot=snapshot,
                                    read_only=read_only)
        except self._rbd.ImageNotFound as err:
            what = f"snapshot {snapshot} of " if snapshot else ""
            raise errors.CephError(reason=f"{disk.target}: {what}{disk.spec} not found") from err
        except self._rbd.Error as err:
            raise rbdconn.describe(err, self.options, f"{disk.target}: opening {disk.spec}") from err
        try:
            yield image
        finally:
            image.close()

    def snapshots(self, disk: RbdDisk) -> list[str]:
        with self._image(disk) as image:
            return [s["name"] for s in image.list_snaps()]

    # -- chain upkeep -----------------------------------------------------------
    def check_parent(self, parent: str) -> None:
        for disk in self.disks:
            if parent not in self.snapshots(disk):
                raise errors.ChainError(
                    reason=f"{disk.target}: RBD snapshot {parent} of {disk.spec} is missing (it tracks the changes "
                           f"since the parent point); start a new chain with -l full into a new folder")

    def remove_ours(self, newer_than: int = -1) -> list[str]:
        """Remove ``virtnbdbackup.N`` snapshots with N > ``newer_than`` (all of them with -1)."""
        removed = []
        for disk in self.disks:
            for name in self.snapshots(disk):
                number = naming.checkpoint_number(name)
                if number is not None and number > newer_than:
                    self._remove_snap(disk, name)
                    removed.append(f"{disk.spec}@{name}")
        return removed

    def remove_pending(self) -> list[str]:
        """Remove a full's :data:`PENDING` snapshot left by a run that never committed."""
        removed = []
        for disk in self.disks:
            if PENDING in self.snapshots(disk):
                self._remove_snap(disk, PENDING)
                removed.append(f"{disk.spec}@{PENDING}")
        return removed

    def promote(self, name: str) -> list[str]:
        """After a full committed: remove the previous chain's snapshots, rename :data:`PENDING` to ``name``."""
        removed = self.remove_ours(-1)
        for disk in self.disks:
            with self._image(disk, read_only=False) as image:
                try:
                    image.rename_snap(PENDING, name)
                except self._rbd.Error as err:
                    raise rbdconn.describe(err, self.options, f"{disk.target}: renaming {disk.spec}@{PENDING} "
                                                              f"to {name}") from err
        return removed

    def _remove_snap(self, disk: RbdDisk, name: str) -> None:
        with self._image(disk, read_only=False) as image:
            try:
                if image.is_protected_snap(name):
                    raise errors.CephError(reason=f"{disk.target}: snapshot {disk.spec}@{name} is protected; "
                                                  f"unprotect or remove it by hand")
                image.remove_snap(name)
            except self._rbd.ImageNotFound:
                pass
            except self._rbd.Error as err:
                raise rbdconn.describe(err, self.options, f"{disk.target}: removing {disk.spec}@{name}") from err

    # -- one point ------------------------------------------------------------------
    def snapshot(self, name: str) -> None:
        """Snapshot every tracked image (call it just before the backup job starts)."""
        for disk in self.disks:
            with self._image(disk, read_only=False) as image:
                try:
                    image.create_snap(name)
                except self._rbd.Error as err:
                    raise rbdconn.describe(err, self.options, f"{disk.target}: snapshot {disk.spec}@{name}") from err
            self.created.append((disk, name))
        log.debug("RBD snapshots %s created on %s", name, ", ".join(str(d.spec) for d in self.disks))

    def rollback(self) -> None:
        """Remove the snapshots this run created (the run failed: its point never existed)."""
        for disk, name in reversed(self.created):
            try:
                self._remove_snap(disk, name)
                log.info("removed RBD snapshot %s@%s of the failed run", disk.spec, name)
            except errors.VirtnbdError as err:
                log.warning("could not remove RBD snapshot %s@%s: %s (the next run removes it)", disk.spec, name, err)
        self.created.clear()

    def changed(self, target: str, since: str) -> list[tuple[int, int]]:
        """Merged ranges of the live image that differ from snapshot ``since`` (call after the job started)."""
        disk = next(d for d in self.disks if d.target == target)
        found: list[tuple[int, int]] = []

        def collect(offset: int, length: int, _exists: bool) -> int:
            found.append((offset, length))
            return 0

        with self._image(disk) as image:
            try:
                image.diff_iterate(0, image.size(), since, collect, include_parent=True, whole_object=False)
            except self._rbd.ImageNotFound as err:
                raise errors.ChainError(reason=f"{target}: RBD snapshot {since} of {disk.spec} is missing") from err
            except self._rbd.Error as err:
                raise rbdconn.describe(err, self.options, f"{target}: diff of {disk.spec} since {since}") from err
        ranges = merge(found)
        log.debug("%s: %d changed range(s), %d bytes since RBD snapshot %s", target, len(ranges),
                  sum(r[1] for r in ranges), since)
        return ranges


def tracker_for(options: rbdconn.CephOptions, planned: Sequence[Any]) -> RbdTracker | None:
    """A tracker for the planned disks that are raw RBD disks (None when there are none)."""
    disks = [RbdDisk(pd.target, spec) for pd in planned if tracked(pd.disk) and (spec := image_of(pd.disk))]
    return RbdTracker(options, disks) if disks else None


# -- the hooks the backup engine calls (virtnbd/backup/run.py) ---------------------------

def _mon_host(hosts: Sequence[tuple[str, str | None]]) -> str:
    """libvirt ``<host name port>`` list -> ``mon_host`` (v1 unless the port is msgr2's 3300)."""
    items = []
    for name, port in hosts:
        if not port:
            items.append(name)
        else:
            items.append(f"{'v2' if port == '3300' else 'v1'}:{name}:{port}")
    return ",".join(items)


def from_libvirt(options: rbdconn.CephOptions, dom: Any, plan: Any) -> rbdconn.CephOptions:
    """Without a Ceph config on this host, reach the cluster the way QEMU does: the disk's
    ``<host>`` elements, ``<auth username>`` and the key in its libvirt secret.

    Only when the config is the default one and missing; on anything unusable the
    options are returned unchanged (and connecting then says what is missing).
    """
    if dom is None or options.mon_host is not None or options.conf != rbdconn.DEFAULT_CONF \
            or os.path.exists(options.conf):
        return options
    import base64

    import libvirt
    from lxml import etree

    targets = [pd.target for pd in plan.disks if tracked(pd.disk)]
    try:
        root = etree.fromstring(dom.XMLDesc(0).encode())
        for disk in root.findall("devices/disk"):
            target = disk.find("target")
            source = disk.find("source")
            if target is None or target.get("dev") not in targets or source is None:
                continue
            auth = disk.find("auth")
            auth = auth if auth is not None else source.find("auth")
            hosts = [(h.get("name", ""), h.get("port")) for h in source.findall("host") if h.get("name")]
            secret_el = auth.find("secret") if auth is not None else None
            if not hosts or auth is None or secret_el is None:
                return options
            conn = dom.connect()
            if secret_el.get("uuid"):
                secret = conn.secretLookupByUUIDString(secret_el.get("uuid"))
            else:
                secret = conn.secretLookupByUsage(libvirt.VIR_SECRET_USAGE_TYPE_CEPH, secret_el.get("usage"))
            key = base64.b64encode(secret.value()).decode()
            log.debug("no %s: reaching the cluster through disk %s's hosts and libvirt secret",
                      rbdconn.DEFAULT_CONF, target.get("dev"))
            return dataclasses.replace(options, client_id=auth.get("username") or options.client_id,
                                       mon_host=_mon_host(hosts), key=key)
    except (libvirt.libvirtError, etree.XMLSyntaxError) as err:
        log.debug("cannot use the libvirt secret of the RBD disk: %s", err)
    return options


@contextlib.contextmanager
def points(options: rbdconn.CephOptions, plan: Any, committed: Sequence[bool],
           dom: Any = None) -> Iterator[RbdTracker | None]:
    """RBD side of one run: clean stale snapshots, check the parent's, roll back on failure.

    Yields None (and touches no cluster) when the run has no disk in RBD mode
    and creates no checkpoint on a raw RBD disk.
    """
    try:
        needed = plan.checkpoint or _uses_rbd(plan)
        if needed and any(tracked(pd.disk) for pd in plan.disks):
            options = from_libvirt(options, dom, plan)
        tracker = tracker_for(options, plan.disks) if needed else None
    except errors.CephError as err:
        targets = ", ".join(pd.target for pd in plan.disks if tracked(pd.disk))
        raise errors.CephError(reason=f"raw RBD disk(s) {targets}: the RBD snapshots that track changes need "
                                      f"the cluster ({err.reason}); give --ceph-conf/--ceph-id/--ceph-keyring, "
                                      f"or back up with -l copy") from err
    if tracker is None:
        yield None
        return
    with tracker:
        stale = tracker.remove_pending()
        if stale:
            log.warning("removed RBD snapshot(s) %s of a full that never committed", ", ".join(stale))
        if plan.level in ("inc", "diff"):
            removed = tracker.remove_ours(plan.last_index)
            if removed:
                log.warning("removed RBD snapshot(s) %s of an earlier run that never completed", ", ".join(removed))
            if _uses_rbd(plan):
                tracker.check_parent(plan.parent)
        try:
            yield tracker
        except BaseException:
            if not committed[0]:
                tracker.rollback()
            raise


def _uses_rbd(plan: Any) -> bool:
    return any(pd.mode == MODE for pd in plan.disks)


def snapshot(tracker: RbdTracker | None, plan: Any) -> None:
    """Take this point's snapshots: call right before the job starts (inside freeze/pause).

    A full's are named :data:`PENDING` until its point commits (:func:`promote`), so a
    full that fails leaves the previous chain's snapshots, and that chain, as they were.
    """
    if tracker is not None and plan.checkpoint:
        tracker.snapshot(PENDING if plan.level == "full" else plan.checkpoint)


def promote(options: rbdconn.CephOptions, plan: Any, dom: Any = None) -> None:
    """A committed full's chain switch on the RBD side (a new cluster connection: the run's is closed)."""
    if not plan.checkpoint or not any(tracked(pd.disk) for pd in plan.disks):
        return
    tracker = tracker_for(from_libvirt(options, dom, plan), plan.disks)
    if tracker is None:
        return
    with tracker:
        removed = tracker.promote(plan.checkpoint)
    if removed:
        log.info("new chain: removed old RBD snapshots %s", ", ".join(removed))


def status_for(tracker: RbdTracker | None, pd: Any, parent: str | None, status: StatusFn,
               bitmap: str | None) -> tuple[StatusFn, str | None]:
    """Block-status function and dirty context for one disk: RBD diff for disks in RBD mode."""
    if pd.mode != MODE:
        return status, bitmap
    if tracker is None or parent is None:
        raise errors.ChainError(reason=f"{pd.target}: RBD incremental without a parent snapshot")
    return with_dirty_context(status, tracker.changed(pd.target, parent)), DIRTY_CONTEXT
