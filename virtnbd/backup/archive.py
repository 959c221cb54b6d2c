"""Move a broken chain out of the way: ``FOLDER/chain-<stamp>/`` holds it, still restorable.

Used when a chain cannot be continued (lost bitmaps) and the user allowed a new
chain (``-l auto`` or ``--fallback-full``): the next full backup then goes into
the same ``-o`` folder, so nightly jobs need no change, and the old chain stays
a complete backup set of its own (``virtnbdrestore -i FOLDER/chain-<stamp>``).

Crash safety: the files move into ``.chain-<stamp>.moving`` first (the
manifest last), then that folder is renamed. A run killed half-way leaves the
``.moving`` folder behind; :func:`resume` (called at the start of every run,
under the folder lock) finishes the move, so the chain is never split.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from virtnbd import errors, fsutil
from virtnbd.backup import output
from virtnbd.backupset import naming

log = logging.getLogger(__name__)

PREFIX = "chain-"
MOVING = ".moving"
REMOVING = ".removing"    # an archived chain prune is deleting (virtnbd.retention.journal)


def _keep(name: str) -> bool:
    """Entries that stay in the main folder: the lock and earlier archived chains."""
    return name == output.LOCK_FILE or name.startswith(PREFIX) or (name.startswith(f".{PREFIX}")
                                                                   and name.endswith((MOVING, REMOVING)))


def _move_all(folder: Path, tmp: Path) -> None:
    manifest = folder / naming.MANIFEST
    for entry in sorted(folder.iterdir()):
        if _keep(entry.name) or entry == manifest:
            continue
        os.replace(entry, tmp / entry.name)
    if manifest.exists():
        os.replace(manifest, tmp / naming.MANIFEST)
    fsutil.fsync_dir(tmp)
    fsutil.fsync_dir(folder)


def _finish(folder: Path, tmp: Path) -> Path:
    final = folder / tmp.name[1:-len(MOVING)]
    _move_all(folder, tmp)
    os.replace(tmp, final)
    fsutil.fsync_dir(folder)
    return final


def archive(folder: Path, stamp: str) -> Path:
    """Move the folder's chain into ``chain-<stamp>`` (made unique); returns the new folder."""
    name, n = f"{PREFIX}{stamp}", 1
    while (folder / name).exists() or (folder / f".{name}{MOVING}").exists():
        n += 1
        name = f"{PREFIX}{stamp}.{n}"
    tmp = folder / f".{name}{MOVING}"
    try:
        tmp.mkdir(mode=0o700)
        return _finish(folder, tmp)
    except OSError as err:
        raise fsutil.storage_error(tmp, err) from err


def resume(folder: Path) -> list[Path]:
    """Finish moves a killed run left half-done."""
    done = []
    for tmp in sorted(folder.glob(f".{PREFIX}*{MOVING}")):
        if not tmp.is_dir():
            continue
        try:
            final = _finish(folder, tmp)
        except OSError as err:
            raise errors.BackupSetError(path=str(tmp), reason=f"cannot finish moving an old chain: {err}") from err
        log.warning("finished moving the old chain of an interrupted run into %s", final)
        done.append(final)
    return done
