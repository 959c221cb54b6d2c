"""Start-of-run recovery of a backup set after a killed run (called under the set's lock).

* A half-done move of a broken chain into ``chain-<stamp>/`` is finished, and
  what a killed writer left is dropped: partial data files (``*.partial``) and
  temp files of atomic saves (``.*.tmp``) of a folder, multipart uploads in an
  object store (:meth:`virtnbd.backupset.store.Store.recover`). The lock proves
  no live run writes them and no manifest lists them.
* A prune or consolidation killed half-way is rolled back or finished
  (:func:`virtnbd.retention.journal.recover_root`).
* In an object store, data streams a killed run completed (its multipart upload done)
  but never committed, i.e. ``*.data`` objects at the top of the prefix that no point of
  the manifest lists, are removed with a log line each (:func:`drop_uncommitted`).

Stale libvirt backup jobs, scratch folders and checkpoints of a killed run are
handled per run type (``run._clean_stale`` online, ``offline.clean_leftovers``).
"""
from __future__ import annotations

import logging

from virtnbd import errors
from virtnbd.backupset import manifest, naming
from virtnbd.backupset.store import LocalStore, Store
from virtnbd.retention import journal

log = logging.getLogger(__name__)


def recover(store: Store) -> list[str]:
    """Bring the set back to its last committed state; returns what was removed or moved."""
    changed = store.recover()
    journal.recover_root(store)      # a prune/consolidation killed half-way (virtnbd.retention.journal)
    return changed + drop_uncommitted(store)


def drop_uncommitted(store: Store) -> list[str]:
    """Remove the streams of an object store that no point lists (a killed run's completed uploads).

    Only with a readable manifest (a prefix without one is not known to be a set) and only top-level
    ``*.data`` objects; a folder keeps such files (its writer publishes a stream only right before
    the manifest, and the next point of the same name replaces it).
    """
    if isinstance(store, LocalStore):
        return []
    raw = store.read_bytes(naming.MANIFEST)
    if raw is None:
        return []
    try:
        found = manifest.from_json(raw, store.describe(naming.MANIFEST))
    except errors.FormatError:
        return []                     # the run itself reports the manifest
    listed = {d.file for p in found.points for d in p.disks.values()}
    orphans = [n for n in store.list() if n.endswith(naming.DATA_SUFFIX) and n not in listed]
    for name in orphans:
        log.warning("%s: removed: no point of the manifest lists it (a killed run's uncommitted stream)",
                    store.describe(name))
        store.remove(name)
    return orphans
