"""Start-of-run recovery of a backup set after a killed run (called under the set's lock).

* A half-done move of a broken chain into ``chain-<stamp>/`` is finished, and
  what a killed writer left is dropped: partial data files (``*.partial``) and
  temp files of atomic saves (``.*.tmp``) of a folder, multipart uploads in an
  object store (:meth:`virtnbd.backupset.store.Store.recover`). The lock proves
  no live run writes them and no manifest lists them.
* A prune or consolidation killed half-way is rolled back or finished
  (:func:`virtnbd.retention.journal.recover_root`).

Stale libvirt backup jobs, scratch folders and checkpoints of a killed run are
handled per run type (``run._clean_stale`` online, ``offline.clean_leftovers``).
"""
from __future__ import annotations

import logging

from virtnbd.backupset.store import Store
from virtnbd.retention import journal

log = logging.getLogger(__name__)


def recover(store: Store) -> list[str]:
    """Bring the set back to its last committed state; returns what was removed or moved."""
    changed = store.recover()
    journal.recover_root(store)      # a prune/consolidation killed half-way (virtnbd.retention.journal)
    return changed
