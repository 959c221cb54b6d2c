"""The encrypted kind of stream set (``stream+aead``): its registration and the command's secret.

A store holding ``virtnbd.keys.json`` next to its manifest is an encrypted set.
The kind registers its probe ahead of the plain stream set (``install``);
the command says once which secret to use (``use_keys``) and every set opened
afterwards is unlocked with it (one KDF run per set, cached).

This module stays light: the sealed set itself (``backupset/sealed.py``: the AEAD
stage, key slots, ``cryptography``) is imported only when a probe finds a key slot
file or a backup starts a chain with a key. A plain set never loads it.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, cast

from virtnbd import errors
from virtnbd.backupset import naming
from virtnbd.backupset.api import BackupSet, register_kind
from virtnbd.backupset.manifest import Manifest
from virtnbd.backupset.store import Store, open_store, scheme_of
from virtnbd.crypto.keysource import KeySpec

if TYPE_CHECKING:
    from virtnbd.backupset.sealed import EncryptedSet
    from virtnbd.crypto.setkey import SetKey

KIND = naming.ENCRYPTED_KIND
POINT_KEY = naming.ENCRYPTION_RECORD

_spec = KeySpec()
_keyless_ok = False
_unlocked: dict[str, SetKey] = {}


def use_keys(spec: KeySpec, keyless_ok: bool = False) -> None:
    """The secret every encrypted set opened from now on is unlocked with (set by the command)."""
    global _spec, _keyless_ok
    _spec, _keyless_ok = spec, keyless_ok
    _unlocked.clear()


def use_for(location: str, spec: KeySpec) -> None:
    """For a command that opens sets by name (map, mount): the kind installed and ``spec`` the secret.

    A key named for a plain set is refused (the user expects encryption)."""
    install()
    use_keys(spec)
    plain_key_given(location, spec)


def is_encrypted(bset: BackupSet) -> bool:
    return bset.kind == KIND


def manifest_key(bset: Any) -> bytes | None:
    """The MAC key of ``bset``'s manifest: None for a plain set; KeyRequired for a locked encrypted one."""
    return bset.manifest_key() if is_encrypted(bset) else None


def authenticate(bset: BackupSet) -> None:
    """An encrypted set opened with its key: manifest and every sealed side file authenticated."""
    if not is_encrypted(bset):
        return
    sealed_set = cast("EncryptedSet", bset)
    found = sealed_set.manifest() if sealed_set.key is not None else None
    if found is not None:
        sealed_set.check_side_files(found)


def _probe(store: Store) -> BackupSet | None:
    if store.size(naming.KEYS) is None or store.size(naming.MANIFEST) is None:   # plain sets: one look
        return None
    from virtnbd.backupset import sealed  # an encrypted set: now the crypto is needed
    return sealed.open_found(store, _spec, _keyless_ok, _unlocked)


def _create(store: Store) -> BackupSet:
    raise errors.UsageError(reason="an encrypted set is started by a full backup with a key (for_backup)")


def install() -> None:
    """Register the kind ahead of the plain stream set (idempotent)."""
    register_kind(KIND, _probe, _create, first=True)


def for_backup(bset: Any, spec: KeySpec, found: Manifest | None, level: str) -> Any:
    """The set a backup writes into: encrypted when its chain is (or a new chain gets a key).

    Raises KeyRequired / WrongKey / EncryptionError before anything is written."""
    store = bset.store
    has_ring = store.size(naming.KEYS) is not None
    if level in ("copy", "full") and (found is None or not found.points):
        if not spec.given:
            if has_ring:
                store.remove(naming.KEYS)      # left by an encrypted full that never committed
            return bset
        from virtnbd.backupset import sealed
        return sealed.new_chain(store, spec)
    recorded = {(p.extra.get(POINT_KEY) or {}).get("fingerprint") for p in (found.points if found else ())}
    if not has_ring:
        if spec.given:
            raise errors.EncryptionError(path=bset.location, reason="a key was given but the chain is not encrypted")
        if recorded - {None}:
            raise errors.KeyRequired(path=bset.location, reason="the chain is encrypted but its key slot file is "
                                                                "missing")
        return bset
    from virtnbd.backupset import sealed
    return sealed.continue_chain(store, spec, _unlocked)


def holds_keys(location: str) -> bool:
    """The set at ``location`` (a folder or a store URL) has a key slot file: it is encrypted."""
    if scheme_of(location) is None:
        return os.path.exists(os.path.join(location, naming.KEYS))
    return open_store(location).read_bytes(naming.KEYS) is not None     # a GET: its errors say more than a HEAD's


def plain_key_given(location: str, spec: KeySpec) -> None:
    """A key named for a set that is not encrypted is an error (the user expects encryption)."""
    if not spec.given or holds_keys(location):
        return
    there = os.path.isdir(location) if scheme_of(location) is None else open_store(location).exists()
    if there:
        raise errors.EncryptionError(path=location, reason="a key was given but the backup set is not encrypted")
