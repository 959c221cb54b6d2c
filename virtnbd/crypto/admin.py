"""``virtnbdkey``: create key files, list / add / remove key slots, change a passphrase.

Only the key slot file of the set changes (written atomically under the
folder lock); data files, manifest and side files are never touched.
"""
from __future__ import annotations

import logging
from pathlib import Path

from virtnbd import errors
from virtnbd.crypto import keyring, keysource, store
from virtnbd.crypto.keyoptions import KeyOptions
from virtnbd.crypto.keyring import Keyring
from virtnbd.crypto.keysource import KeySpec, Secret

log = logging.getLogger(__name__)
def _ring(folder: str) -> Keyring:
    ring = store.load_ring(folder)
    if ring is None:
        raise errors.EncryptionError(path=folder, reason="the backup set is not encrypted (no key slot file)")
    return ring


def _unlock(folder: str, ring: Keyring, spec: KeySpec) -> tuple[bytes, keyring.Slot]:
    return keyring.unlock(ring, store.require_secret(spec, folder), str(store.keys_path(folder)))


def _new_secret(spec: KeySpec) -> Secret:
    secret = keysource.load(spec, new=True)
    if secret is None:
        raise errors.UsageError(reason="name the new secret: --new-key-file FILE or --new-passphrase-file FILE "
                                       "(or VIRTNBD_NEW_KEY_FILE / VIRTNBD_NEW_PASSPHRASE)")
    return secret


def list_slots(folder: str) -> list[str]:
    ring = _ring(folder)
    lines = [f"set {ring.set_id}  cipher {ring.cipher}  key fingerprint {ring.fingerprint}"]
    lines += [f"slot {s.id}  {s.kind:<10}  {s.kdf.get('name')}  created {s.created}" for s in ring.slots]
    return lines


def add(folder: str, key: KeySpec, new_key: KeySpec) -> keyring.Slot:
    ring = _ring(folder)
    master, _ = _unlock(folder, ring, key)
    updated, slot = keyring.add_slot(ring, master, _new_secret(new_key))
    store.save_ring(folder, updated)
    log.info("added %s key slot %s", slot.kind, slot.id)
    return slot


def remove(folder: str, key: KeySpec, slot_id: str) -> None:
    ring = _ring(folder)
    _unlock(folder, ring, key)                    # only someone holding a key may remove slots
    store.save_ring(folder, keyring.remove_slot(ring, slot_id, str(store.keys_path(folder))))
    log.info("removed key slot %s", slot_id)


def passwd(folder: str, key: KeySpec, new_key: KeySpec) -> keyring.Slot:
    """Replace the slot the current secret opens by one for the new secret (one atomic write)."""
    ring = _ring(folder)
    master, old = _unlock(folder, ring, key)
    updated, slot = keyring.add_slot(ring, master, _new_secret(new_key))
    store.save_ring(folder, keyring.remove_slot(updated, old.id, str(store.keys_path(folder))))
    log.info("key slot %s replaced by %s slot %s", old.id, slot.kind, slot.id)
    return slot


def run(options: KeyOptions) -> list[str]:
    """Do ``options.action``; the lines to print."""
    if options.action == "create-keyfile":
        keysource.create_key_file(str(options.path))
        return [f"created key file {options.path} (32 random bytes, mode 0600): keep a copy off this host"]
    folder = str(options.input)
    if not Path(folder).is_dir():
        raise errors.BackupSetError(path=folder, reason="backup folder does not exist")
    if options.action == "list":
        return list_slots(folder)
    from virtnbd.backupset.store import folder_lock
    with folder_lock(Path(folder)):
        if options.action == "add":
            return [f"added key slot {add(folder, options.key, options.new_key).id}"]
        if options.action == "remove":
            remove(folder, options.key, str(options.slot))
            return [f"removed key slot {options.slot}"]
        return [f"passphrase changed: new key slot {passwd(folder, options.key, options.new_key).id}"]
