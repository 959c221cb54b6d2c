"""File names inside a backup folder (one folder per chain; spec: docs/FORMAT.md).

Names are the ones virtnbdbackup uses, so people and scripts find their way::

    sda.copy.data   sda.full.data   sda.inc.virtnbdbackup.3.data   sda.diff.1700000000.data
"""
from __future__ import annotations

import re

from virtnbd import errors

MANIFEST = "virtnbd.manifest.json"
KEYS = "virtnbd.keys.json"        # key slots: the set is encrypted (crypto/keyring.py, backupset/sealed.py)
ENCRYPTED_KIND = "stream+aead"   # the kind of an encrypted stream set (backupset/encrypted.py)
ENCRYPTION_RECORD = "encryption"  # Point.extra of an encrypted point: set_id, cipher, key fingerprint
CHECKPOINT_PREFIX = "virtnbdbackup"
DATA_SUFFIX = ".data"
LEVELS = ("copy", "full", "inc", "diff")
ARCHIVE_PREFIX = "chain-"        # FOLDER/chain-<stamp>/: a chain moved aside (virtnbd.backup.archive)
MOVING = ".moving"               # .chain-<stamp>.moving: a move in progress (finished by Store.recover)
REMOVING = ".removing"           # .chain-<stamp>.removing: an archived chain prune is deleting
LOCKS = (".virtnbdbackup.lock", ".virtnbd.lock")     # a folder's lock file, an object store's lock object


def stays(name: str) -> bool:
    """Entries that stay when a chain moves aside: the lock and archived chains (and their markers)."""
    return name in LOCKS or name.startswith(ARCHIVE_PREFIX) or (
        name.startswith(f".{ARCHIVE_PREFIX}") and name.endswith((MOVING, REMOVING)))

_SAFE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:+-]*$")


def _check(what: str, value: str) -> None:
    if not _SAFE.match(value) or ".." in value:
        raise errors.UsageError(reason=f"{what} {value!r} is not usable in a file name")


def checkpoint_name(number: int) -> str:
    """``virtnbdbackup.N``: the checkpoint (and point) name of the N-th full/inc backup."""
    return f"{CHECKPOINT_PREFIX}.{number}"


def checkpoint_number(name: str) -> int | None:
    """N of ``virtnbdbackup.N`` (None for any other name)."""
    m = re.fullmatch(rf"{CHECKPOINT_PREFIX}\.(\d+)", name)
    return int(m.group(1)) if m else None


def diff_point_name(epoch: int) -> str:
    return f"diff.{epoch}"


def data_file(disk: str, level: str, point_name: str) -> str:
    """File name of ``disk``'s stream for a point.

    ``copy``/``full`` -> ``sda.copy.data``/``sda.full.data``; ``inc`` ->
    ``sda.inc.<point>.data``; ``diff`` -> ``sda.<point>.data`` where the point
    is ``diff.<epoch>`` (a bare epoch is accepted too).
    """
    _check("disk name", disk)
    _check("point name", point_name)
    if level in ("copy", "full"):
        return f"{disk}.{level}{DATA_SUFFIX}"
    if level == "inc":
        return f"{disk}.inc.{point_name}{DATA_SUFFIX}"
    if level == "diff":
        name = point_name if point_name.startswith("diff.") else f"diff.{point_name}"
        return f"{disk}.{name}{DATA_SUFFIX}"
    raise errors.UsageError(reason=f"unknown backup level {level!r} (use {', '.join(LEVELS)})")


def synthetic_full_file(disk: str, point_name: str) -> str:
    """``sda.full.virtnbdbackup.19.data``: a full made by consolidating a chain up to that point."""
    _check("disk name", disk)
    _check("point name", point_name)
    return f"{disk}.full.{point_name}{DATA_SUFFIX}"
