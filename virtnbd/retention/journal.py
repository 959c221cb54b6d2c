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
Whole archived chains go by renaming the folder to ``.chain-*.removing``
(atomic; it is then no chain any more) and removing that.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from virtnbd import errors, fsutil
from virtnbd.backupset import manifest as bsmanifest
from virtnbd.retention import layout

log = logging.getLogger(__name__)

JOURNAL = ".virtnbd.prune.journal"


def begin(folder: Path, files: Iterable[str], reason: str) -> None:
    doc = {"reason": reason, "files": sorted(set(files))}
    fsutil.save_atomic(folder / JOURNAL, (json.dumps(doc, indent=1) + "\n").encode())


def _journalled(folder: Path) -> list[str] | None:
    try:
        doc = json.loads((folder / JOURNAL).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise errors.BackupSetError(path=str(folder / JOURNAL), reason=f"unreadable prune journal: {err}") from err
    files = doc.get("files") if isinstance(doc, dict) else None
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        raise errors.BackupSetError(path=str(folder / JOURNAL), reason="prune journal has no file list")
    return files


def remove_unlisted(folder: Path, files: Iterable[str], why: str) -> list[str]:
    """Delete ``files`` that the folder's manifest does not list (never one it lists)."""
    current = bsmanifest.load(folder)
    listed = layout.listed_files(current) if current is not None else set()
    removed = []
    for name in sorted(set(files) - listed):
        path = folder / name
        if not path.resolve().is_relative_to(folder.resolve()):
            log.warning("%s: not removing %s: outside the chain folder", folder, name)
            continue
        if _remove(path):
            log.info("removed %s (%s)", path, why)
            removed.append(name)
    fsutil.fsync_dir(folder)
    return removed


def _remove(path: Path) -> bool:
    with contextlib.suppress(FileNotFoundError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(fsutil.partial_path(path))
        return True
    with contextlib.suppress(FileNotFoundError):
        os.unlink(fsutil.partial_path(path))
    return False


def finish(folder: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        (folder / JOURNAL).unlink()
    fsutil.fsync_dir(folder)


def recover(folder: Path) -> list[str]:
    """Finish or roll back a change a killed run left half-done (see the module doc)."""
    files = _journalled(folder)
    if files is None:
        return []
    log.warning("%s: finishing a prune/consolidation an earlier run left half-done", folder)
    removed = remove_unlisted(folder, files, "left by an interrupted prune or consolidation")
    finish(folder)
    return removed


def remove_chain(folder: Path, why: str) -> None:
    """Remove a whole archived chain folder: rename it out of sight, then delete it."""
    gone = folder.with_name(f".{folder.name}{layout.REMOVING}")
    os.replace(folder, gone)
    fsutil.fsync_dir(folder.parent)
    log.info("removed chain %s (%s)", folder, why)
    shutil.rmtree(gone)


def recover_root(root: Path) -> None:
    """Finish removals of whole chains, and journals of every chain under the root."""
    for gone in sorted(root.glob(f".*{layout.REMOVING}")):
        log.warning("finishing the removal of %s", gone)
        shutil.rmtree(gone, ignore_errors=True)
    for folder in [*layout.archived(root), root]:
        recover(folder)
