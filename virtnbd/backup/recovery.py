"""Start-of-run recovery of a backup folder after a killed run (called under the folder lock).

* A half-done move of a broken chain into ``chain-<stamp>/`` is finished
  (:func:`virtnbd.backup.archive.resume`).
* A prune or consolidation killed half-way is rolled back or finished
  (:func:`virtnbd.retention.journal.recover_root`).
* Partial data files (``*.partial``) and temp files of atomic saves
  (``.*.tmp``) are removed: the lock proves no live run writes them, and the
  manifest never lists them, so they hold nothing a restore could use.

Stale libvirt backup jobs, scratch folders and checkpoints of a killed run are
handled per run type (``run._clean_stale`` online, ``offline.clean_leftovers``).
"""
from __future__ import annotations

import contextlib
import logging
import shutil
from pathlib import Path

from virtnbd import fsutil
from virtnbd.backup import archive
from virtnbd.retention import journal

log = logging.getLogger(__name__)


def stale_files(folder: Path) -> list[Path]:
    found = [p for p in folder.glob(f"*{fsutil.PARTIAL_SUFFIX}")]
    found += [p for p in folder.glob(".*.tmp")]
    return sorted(found)


def recover(folder: Path) -> list[Path]:
    """Bring the folder back to its last committed state; returns what was removed or moved."""
    changed = archive.resume(folder)
    journal.recover_root(folder)      # a prune/consolidation killed half-way (virtnbd.retention.journal)
    for path in stale_files(folder):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        log.warning("removed %s left by a killed run", path.name)
        changed.append(path)
    return changed
