"""The key slot file of a backup set (``virtnbd.keys.json``) and unlocking it.

A set is encrypted when its folder holds this file. The commands call
:func:`open_key` (read a set) or :func:`new_key` (a full backup starting a
chain); errors are one line each: no key given for an encrypted set, a key
given for a plain set, a wrong key, a damaged slot file.
"""
from __future__ import annotations

import os
from pathlib import Path

from virtnbd import errors, fsutil
from virtnbd.backupset.naming import KEYS
from virtnbd.crypto import keyring, keysource
from virtnbd.crypto.keyring import Keyring
from virtnbd.crypto.keysource import KeySpec, Secret
from virtnbd.crypto.setkey import SetKey

HOW = ("give --key-file FILE or --passphrase-file FILE (or set VIRTNBD_KEY_FILE / VIRTNBD_PASSPHRASE)")


def keys_path(folder: str | os.PathLike[str]) -> Path:
    return Path(folder) / KEYS


def load_ring(folder: str | os.PathLike[str]) -> Keyring | None:
    path = keys_path(folder)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise errors.EncryptionError(path=str(path), reason=err.strerror or str(err)) from err
    return keyring.from_json(data, str(path))


def save_ring(folder: str | os.PathLike[str], ring: Keyring) -> None:
    fsutil.save_atomic(keys_path(folder), keyring.to_json(ring))


def set_key(ring: Keyring, master: bytes) -> SetKey:
    return SetKey(ring.set_id, ring.cipher, ring.fingerprint, master)


def require_secret(spec: KeySpec, where: str) -> Secret:
    secret = keysource.load(spec)
    if secret is None:
        raise errors.KeyRequired(path=where, reason=f"the backup set is encrypted: {HOW}")
    return secret


def open_key(folder: str | os.PathLike[str], spec: KeySpec) -> SetKey | None:
    """The unlocked key of the set in ``folder``; None for a plain set (a key given for it is an error)."""
    ring = load_ring(folder)
    if ring is None:
        if spec.given:
            raise errors.EncryptionError(path=str(folder), reason="a key was given but the backup set is not "
                                                                  "encrypted")
        return None
    master, _slot = keyring.unlock(ring, require_secret(spec, str(folder)), str(keys_path(folder)))
    return set_key(ring, master)


def new_key(spec: KeySpec, cipher: str | None = None) -> tuple[Keyring, SetKey] | None:
    """A fresh master key for a new chain (saved by the caller with the first point), or None unencrypted."""
    secret = keysource.load(spec)
    if secret is None:
        return None
    ring, master = keyring.create(secret, cipher)
    return ring, set_key(ring, master)
