"""``-a verify``: decode every frame of every file, check every checksum and chain link, write nothing.

Files are checked in parallel (``workers`` at once), each read sequentially
start to end. Every file is checked even after a failure, then a summary of
all is logged and the FIRST failure (in chain order) is raised, so the exit
code is 1 and the error line names its file and offset.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from virtnbd import errors
from virtnbd.backupset.api import open_set
from virtnbd.restore.source import ChainFile, ChainFileError, DiskChain, Selection, chain_file, manifest_of

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FileResult:
    file: ChainFile
    disk: str
    error: errors.VirtnbdError | None
    stored_bytes: int = 0


def select_all(folder: str, until: str | None, disk: str | None) -> Selection:
    """Every point of the set (up to ``until`` when given), every disk (or ``disk``), in manifest order."""
    bset = open_set(folder)
    manifest = manifest_of(bset)
    points = list(manifest.points)
    if until is not None:
        names = [p.name for p in points]
        matches = [i for i, p in enumerate(points) if until in (p.name, p.checkpoint)]
        if not matches:
            raise errors.ChainError(reason=f"no point {until!r} in the backup set; available: {', '.join(names)}")
        points = points[: matches[0] + 1]
    disks: dict[str, list[ChainFile]] = {}
    for point in points:
        for name, entry in point.disks.items():
            if disk is None or name == disk:
                disks.setdefault(name, []).append(chain_file(bset, point, entry))
    if disk is not None and disk not in disks:
        raise errors.UsageError(reason=f"disk {disk!r} is not in the backup set")
    chains = tuple(DiskChain(name, tuple(files)) for name, files in sorted(disks.items()))
    return Selection(folder=folder, manifest=manifest, points=tuple(points), disks=chains, bset=bset)


def _read_ahead(path: str) -> None:
    """Ask the kernel to read the whole file in the background, so disk reads overlap the hashing."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return  # reported by the check itself
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
    except OSError as err:
        log.debug("%s: fadvise: %s", path, err)
    finally:
        os.close(fd)


def _check_file(cf: ChainFile, disk: str) -> FileResult:
    from virtnbd.restore.source import opened  # local: keeps the module import light for the CLI
    _read_ahead(cf.path)
    try:
        with opened(cf) as reader:
            totals = reader.verify()
            meta = reader.meta
        _compare(cf, disk, meta, totals)
        return FileResult(cf, disk, None, totals.stored_bytes)
    except errors.FormatError as err:
        return FileResult(cf, disk, ChainFileError(path=err.path, point=cf.point,
                                                   reason=f"offset {err.offset}: {err.reason}"))
    except errors.VirtnbdError as err:
        return FileResult(cf, disk, err)


def _compare(cf: ChainFile, disk: str, meta: Any, totals: Any) -> None:
    def fail(reason: str) -> None:
        raise ChainFileError(path=cf.path, point=cf.point, reason=reason)

    if meta.disk != disk:
        fail(f"holds disk {meta.disk}, expected {disk}")
    entry = cf.entry
    if entry is None:
        return
    if meta.virtual_size != entry.virtual_size:
        fail(f"virtual size {meta.virtual_size}, manifest says {entry.virtual_size}")
    checks = (("stored bytes", "stored_bytes"), ("data bytes", "data_bytes"), ("zero bytes", "zero_bytes"),
              ("chained digest", "digest"), ("file digest", "file_digest"))
    for label, key in checks:
        want = getattr(entry, key, None)
        got = getattr(totals, key)
        if want not in (None, "", 0) and want != got:
            fail(f"{label} {got}, manifest recorded {want}")


def _chain_errors(selection: Selection) -> list[errors.VirtnbdError]:
    """Parent links: every inc/diff point's parent is in the set, and each of its streams records
    the checkpoint of that parent as its own parent."""
    if selection.manifest is None:
        return []
    by_name = {p.name: p for p in selection.manifest.points}
    problems: list[errors.VirtnbdError] = []
    for point in selection.points:
        if point.level not in ("copy", "full") and (not point.parent or point.parent not in by_name):
            problems.append(errors.ChainError(reason=f"point {point.name}: parent {point.parent} is not in the set"))
    for chain in selection.disks:
        for cf in chain.files:
            point = by_name.get(cf.point)
            if point is None or point.level in ("copy", "full") or point.parent not in by_name:
                continue
            want = by_name[point.parent].checkpoint or point.parent
            got = _stream_parent(cf)
            if got is not None and got != want:
                problems.append(ChainFileError(path=cf.path, point=cf.point,
                                               reason=f"parent checkpoint {got}, expected {want} (chain broken)"))
    return problems


def _stream_parent(cf: ChainFile) -> str | None:
    from virtnbd.restore.source import opened
    try:
        with opened(cf) as reader:
            return reader.meta.parent
    except errors.VirtnbdError:
        return None  # reported by the file check


def run(selection: Selection, workers: int = 4) -> list[FileResult]:
    jobs = [(cf, chain.disk) for chain in selection.disks for cf in chain.files]
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="verify") as pool:
        results = list(pool.map(lambda job: _check_file(*job), jobs))
    problems = _chain_errors(selection)
    _summary(results, problems)
    failed = [r.error for r in results if r.error is not None] + problems
    if failed:
        raise failed[0]
    return results


def _summary(results: Sequence[FileResult], problems: Sequence[errors.VirtnbdError]) -> None:
    ok = sum(1 for r in results if r.error is None)
    total = sum(r.stored_bytes for r in results)
    for r in results:
        if r.error is None:
            log.info("ok      %-4s %-22s %s", r.disk, r.file.point, r.file.path)
        else:
            log.error("FAILED  %-4s %-22s %s", r.disk, r.file.point, r.error)
    for p in problems:
        log.error("FAILED  chain: %s", p)
    bad = len(results) - ok + len(problems)
    log.info("verify: %d file(s) ok (%d bytes), %d problem(s)", ok, total, bad)
