"""Crash-safe removal: a journal names every file a prune/consolidation may create or delete.

Order of one change to a chain folder:

1. the journal (``.virtnbd.prune.journal``) lists the new files it will write
   and the old files it will delete, fsynced;
2. new files are written (``*.partial``, fsync, rename);
3. the manifest is replaced atomically (``save_atomic``: fsync, rename, fsync
   of the folder) -- the one moment the change happens;
4. old files no longer listed are deleted, then the journal.

:func:`recover` (run before every prune and every backup, under the lock)
deletes each journalled file the manifest does not list, then the journal:
killed before step 3 it removes the half-made new files (the old chain is
intact); killed after, it finishes the deletions. The manifest never lists a
file that is gone: files are only deleted once no manifest names them.
Whole archived chains go by a ``.chain-*.removing`` marker, then their manifest
(atomic: it is then no chain any more), then the rest. Every step goes through
the set's :class:`~virtnbd.backupset.store.Store` (a folder or ``s3://``).
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable

from virtnbd import errors, fsutil
from virtnbd.backupset.store import Store
from virtnbd.retention import layout

log = logging.getLogger(__name__)

JOURNAL = ".virtnbd.prune.journal"


def begin(store: Store, files: Iterable[str], reason: str) -> None:
    doc = {"reason": reason, "files": sorted(set(files))}
    store.replace(JOURNAL, (json.dumps(doc, indent=1) + "\n").encode())


def _journalled(store: Store) -> list[str] | None:
    data = store.read_bytes(JOURNAL)
    if data is None:
        return None
    try:
        doc = json.loads(data)
    except ValueError as err:
        raise errors.BackupSetError(path=store.describe(JOURNAL), reason=f"unreadable prune journal: {err}") from err
    files = doc.get("files") if isinstance(doc, dict) else None
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        raise errors.BackupSetError(path=store.describe(JOURNAL), reason="prune journal has no file list")
    return files


def _inside(name: str) -> bool:
    return bool(name) and not os.path.isabs(name) and ".." not in name.split("/")


def remove_unlisted(store: Store, files: Iterable[str], why: str) -> list[str]:
    """Delete ``files`` that the chain's manifest does not list (never one it lists)."""
    current = layout.load_manifest(store)
    listed = layout.listed_files(current) if current is not None else set()
    removed = []
    for name in sorted(set(files) - listed):
        if not _inside(name):
            log.warning("%s: not removing %s: outside the chain folder", store.location, name)
            continue
        if _remove(store, name):
            log.info("removed %s (%s)", store.describe(name), why)
            removed.append(name)
    return removed


def _remove(store: Store, name: str) -> bool:
    """Remove an object (or a folder of them, TPM state) and any partial left of it; True when it existed."""
    existed = store.size(name) is not None
    if existed:
        store.remove(name)
    elif name in store.folders():
        store.remove_tree(name)
        existed = True
    store.remove(name + fsutil.PARTIAL_SUFFIX)
    return existed


def finish(store: Store) -> None:
    store.remove(JOURNAL)


def recover(store: Store) -> list[str]:
    """Finish or roll back a change a killed run left half-done (see the module doc)."""
    files = _journalled(store)
    if files is None:
        return []
    log.warning("%s: finishing a prune/consolidation an earlier run left half-done", store.location)
    removed = remove_unlisted(store, files, "left by an interrupted prune or consolidation")
    finish(store)
    return removed


def remove_chain(root: Store, name: str, why: str) -> None:
    """Remove a whole archived chain: a ``.chain-*.removing`` marker, its manifest (then it is no
    chain any more), everything else, the marker; :func:`recover_root` finishes a killed removal."""
    marker = f".{name}{layout.REMOVING}"
    root.replace(marker, why.encode())
    root.sub(name).remove(layout.MANIFEST)
    log.info("removed chain %s (%s)", root.describe(name), why)
    _finish_removal(root, name, marker)


def _finish_removal(root: Store, name: str, marker: str) -> None:
    root.remove_tree(name)
    root.remove_tree(marker)          # a folder renamed out of sight by earlier versions
    root.remove(marker)


def recover_root(root: Store) -> None:
    """Finish removals of whole chains, and journals of every chain under the root."""
    for marker in sorted({*root.list(), *root.folders()}):
        if marker.startswith(f".{layout.PREFIX}") and marker.endswith(layout.REMOVING):
            log.warning("finishing the removal of %s", root.describe(marker))
            _finish_removal(root, marker[1:-len(layout.REMOVING)], marker)
    for name in layout.archived(root):
        recover(root.sub(name))
    recover(root)
