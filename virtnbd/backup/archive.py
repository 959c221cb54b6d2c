"""Move a broken chain out of the way: ``OUTPUT/chain-<stamp>/`` holds it, still restorable.

Used when a chain cannot be continued (lost bitmaps) and the user allowed a new
chain (``-l auto`` or ``--fallback-full``): the next full backup then goes into
the same ``-o`` location, so nightly jobs need no change, and the old chain stays
a complete backup set of its own (``virtnbdrestore -i OUTPUT/chain-<stamp>``).

The move itself is the store's (:meth:`Store.archive`): a folder moves its files
into ``.chain-<stamp>.moving`` (the manifest last) and renames it; an object
store copies the objects under ``chain-<stamp>/`` (the manifest last) and then
deletes the originals (the manifest first). Either way a run killed half-way
leaves a ``.chain-<stamp>.moving`` marker and :meth:`Store.recover` (called at
the start of every run, under the lock) finishes the move: the chain is never split.
"""
from __future__ import annotations

import logging
from pathlib import Path

from virtnbd.backupset import naming
from virtnbd.backupset.store import LocalStore, Store

log = logging.getLogger(__name__)

PREFIX = naming.ARCHIVE_PREFIX
MOVING = naming.MOVING
REMOVING = naming.REMOVING    # an archived chain prune is deleting (virtnbd.retention.journal)
_keep = naming.stays


def archive_store(store: Store, stamp: str) -> str:
    """Move the store's chain into ``chain-<stamp>`` (made unique); returns where it went."""
    taken = set(store.folders()) | set(store.list())
    name, n = f"{PREFIX}{stamp}", 1
    while name in taken or f".{name}{MOVING}" in taken:
        n += 1
        name = f"{PREFIX}{stamp}.{n}"
    store.archive(name)
    return store.describe(name)


def archive(folder: Path, stamp: str) -> Path:
    """A local folder's chain into ``chain-<stamp>``; returns the new folder."""
    return Path(archive_store(LocalStore(folder), stamp))


def resume(folder: Path) -> list[Path]:
    """Finish moves a killed run left half-done (a local folder; see Store.recover)."""
    store = LocalStore(folder)
    return [folder / name for name in store._resume_moves()]
