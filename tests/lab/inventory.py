"""Before/after inventory of everything a backup run may change outside its data files.

A fault test takes :func:`take` before the fault and after the run(s), then
asserts with :func:`assert_same` (nothing changed) or :func:`changes` (only
what the docs list). Covered: libvirt checkpoints of the domain, persistent
bitmaps in every image (``qemu-img info -U``, with flags), bitmaps QEMU holds
live (``query-named-block-nodes``, running domain only), the domain's backup
job, entries in the scratch folder and in the backup folder.
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.lab.libvirt_lab import LabDomain

Bitmaps = tuple[tuple[str, tuple[str, ...]], ...]          # (name, flags) sorted by name


@dataclass(frozen=True)
class Inventory:
    checkpoints: tuple[str, ...]
    image_bitmaps: tuple[tuple[str, Bitmaps], ...]          # per disk target, from the image header
    live_bitmaps: tuple[tuple[str, tuple[str, ...]], ...]   # per QEMU node, running domain only
    job: bool
    scratch: tuple[str, ...]
    folder: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _listing(path: Path | None, ignore: Iterable[str] = ()) -> tuple[str, ...]:
    if path is None or not path.exists():
        return ()
    skip = set(ignore)
    return tuple(sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.name not in skip))


def _live_bitmaps(domain: LabDomain) -> tuple[tuple[str, tuple[str, ...]], ...]:
    if not domain.is_active():
        return ()
    import libvirt_qemu

    out = libvirt_qemu.qemuMonitorCommand(domain.dom, json.dumps({"execute": "query-named-block-nodes",
                                                                  "arguments": {"flat": True}}), 0)
    found = []
    for node in json.loads(out)["return"]:
        names = tuple(sorted(b.get("name", "(anonymous)") for b in node.get("dirty-bitmaps", [])))
        if names:
            found.append((str(node["node-name"]), names))
    return tuple(sorted(found))


def _job(domain: LabDomain) -> bool:
    import libvirt

    if not domain.is_active():
        return False
    try:
        domain.dom.backupGetXMLDesc(0)
    except libvirt.libvirtError:
        return domain.job_active()
    return True


def take(domain: LabDomain, scratch: Path | None, folder: Path | None, *,
         ignore: Iterable[str] = ("sock",)) -> Inventory:
    """The state now. ``ignore``: names left out of the folder listings (the lab's own files)."""
    ignored = tuple(ignore)
    image_bitmaps = tuple(sorted((t, tuple(sorted((n, tuple(f)) for n, f in d.bitmap_flags().items())))
                                 for t, d in domain.disks.items() if d.spec.fmt == "qcow2"))
    return Inventory(
        checkpoints=tuple(sorted(c.getName() for c in domain.dom.listAllCheckpoints())),
        image_bitmaps=image_bitmaps, live_bitmaps=_live_bitmaps(domain), job=_job(domain),
        scratch=tuple(n for n in _listing(scratch, ignored) if n.startswith("virtnbd.")),
        folder=_listing(folder, ignored))


def changes(before: Inventory, after: Inventory) -> dict[str, tuple[Any, Any]]:
    """Fields that differ: name -> (before, after)."""
    return {k: (getattr(before, k), getattr(after, k)) for k in before.__dataclass_fields__
            if getattr(before, k) != getattr(after, k)}


def assert_same(before: Inventory, after: Inventory, *, allow: Iterable[str] = ()) -> None:
    """Nothing changed except the fields in ``allow`` (e.g. ``folder`` for a run log)."""
    diff = {k: v for k, v in changes(before, after).items() if k not in set(allow)}
    assert not diff, f"changed outside the documented set: {diff}"


def run_logs(folder: Path) -> list[str]:
    """The per-run log files the docs list as the only thing a failed run leaves in the folder."""
    return sorted(p.name for p in folder.glob("backup.*.log"))


def folder_extra(before: Inventory, after: Inventory) -> list[str]:
    """Entries of the backup folder that appeared, except run logs and the folder lock."""
    new = set(after.folder) - set(before.folder)
    return sorted(n for n in new if not (n.startswith("backup.") and n.endswith(".log"))
                  and n != ".virtnbdbackup.lock")
