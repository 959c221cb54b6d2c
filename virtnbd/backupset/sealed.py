"""The encrypted stream set: a StreamSet whose streams, side files and manifest are sealed.

The crypto half of the ``stream+aead`` kind, imported only when a set is encrypted or a key
is given (``backupset/encrypted.py`` registers the kind and holds the command's secret, without
loading ``cryptography``). A store holding ``virtnbd.keys.json`` next to its manifest is an
encrypted set. Without a secret an encrypted set opens only for verify (``keyless_ok``):
streams are checked but not decrypted, side files cannot be read.

With the key, :meth:`EncryptedSet.manifest` authenticates the manifest
(HMAC-SHA256 over its canonical bytes), :meth:`read_side` unseals side files,
:meth:`writing` gives each new stream its encryption record and bound AEAD
stage, :meth:`commit` saves a new chain's key slot file before the first
point and writes the manifest with its MAC. Spec: docs/FORMAT.md, "Encryption".
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, cast

from virtnbd import errors
from virtnbd.backupset import manifest as manifest_mod
from virtnbd.backupset import naming
from virtnbd.backupset.api import StreamSet
from virtnbd.backupset.manifest import Manifest, Point
from virtnbd.backupset.store import Store
from virtnbd.crypto import keyring
from virtnbd.crypto import store as keystore
from virtnbd.crypto.keyring import Keyring
from virtnbd.crypto.keysource import KeySpec
from virtnbd.crypto.setkey import SetKey, is_sealed
from virtnbd.crypto.stage import SealStage, with_encryption
from virtnbd.stream.codec import Stage
from virtnbd.stream.format import StreamMeta

KIND = naming.ENCRYPTED_KIND
POINT_KEY = naming.ENCRYPTION_RECORD
SEALED_GUEST_INFO = "guest_info_sealed"


def load_ring(store: Store) -> Keyring | None:
    data = store.read_bytes(keystore.KEYS)
    return None if data is None else keyring.from_json(data, store.describe(keystore.KEYS))


def unlock(store: Store, ring: Keyring, spec: KeySpec, cache: dict[str, SetKey]) -> SetKey:
    """The set's key (one KDF run per set and command: ``cache`` is the command's, keyed by location)."""
    cached = cache.get(store.location)
    if cached is not None:
        return cached
    master, _slot = keyring.unlock(ring, keystore.require_secret(spec, store.location),
                                   store.describe(keystore.KEYS))
    cache[store.location] = keystore.set_key(ring, master)
    return cache[store.location]


class EncryptedSet(StreamSet):
    kind = KIND

    def __init__(self, store: Store, key: SetKey | None, new_ring: Keyring | None = None) -> None:
        super().__init__(store, (cast(Stage, SealStage(key)),))
        self.key = key
        self.new_ring = new_ring          # a chain being started: saved with its first point

    # -- reading ------------------------------------------------------------------------
    def manifest(self) -> Manifest | None:
        data = self.store.read_bytes(naming.MANIFEST)
        if data is None:
            return None
        found = manifest_mod.from_json(data, self.store.describe(naming.MANIFEST), self._folder())
        if self.key is not None:
            if data != manifest_mod.to_json(found, self.key.manifest_key()):
                raise errors.FormatError(path=self.store.describe(naming.MANIFEST), offset=0,
                                         reason="manifest does not authenticate with the set's key (altered, "
                                                "damaged or not this set's)")
            self._check_points(found)
        return found

    def _check_points(self, found: Manifest) -> None:
        for point in found.points:
            record = point.extra.get(POINT_KEY) or {}
            if record.get("fingerprint") != self.key.fingerprint:  # type: ignore[union-attr]
                raise errors.WrongKey(path=self.location, reason=f"point {point.name} was written with key "
                                                                 f"{record.get('fingerprint')}, not this one")

    def read_side(self, name: str) -> bytes | None:
        raw = super().read_side(name)
        if raw is None:
            return None
        where = self.store.describe(name)
        if not is_sealed(raw):
            raise errors.FormatError(path=where, offset=0, reason="side file of an encrypted set is not sealed")
        if self.key is None:
            raise errors.KeyRequired(path=where, reason="side file is encrypted: give the set's key")
        return self.key.unseal(name, raw, where)

    def check_side_files(self, found: Manifest) -> None:
        """Every sealed side file and field of every point authenticates (before any output)."""
        for point in found.points:
            for name in side_names(point):
                if self.read_side(name) is None:
                    raise errors.FormatError(path=self.store.describe(name), offset=0, reason="side file missing")
            sealed = point.extra.get(SEALED_GUEST_INFO)
            if isinstance(sealed, str) and self.key is not None:
                self.key.unseal_text("guest_info", sealed, self.store.describe(naming.MANIFEST))

    # -- writing ------------------------------------------------------------------------
    def writing(self, meta: StreamMeta, name: str) -> tuple[StreamMeta, tuple[Stage, ...]]:
        key = self._need_key()
        sealed = with_encryption(meta, key)
        return sealed, (cast(Stage, SealStage(key).bind(sealed, self.store.describe(name))),)

    def seal_side(self, name: str, data: bytes) -> bytes:
        return self._need_key().seal(name, data)

    def point_extra(self, extra: Mapping[str, Any]) -> dict[str, Any]:
        """``guest_info`` sealed (OS, host name, file systems); the key record added."""
        key = self._need_key()
        out = dict(extra)
        info = out.pop("guest_info", None)
        if info:
            out[SEALED_GUEST_INFO] = key.seal_text("guest_info", json.dumps(info, sort_keys=True).encode())
        out[POINT_KEY] = {"set_id": key.set_id, "cipher": key.cipher, "fingerprint": key.fingerprint}
        return out

    def commit(self, point: Point, domain: str, domain_uuid: str) -> Manifest:
        key = self._need_key()
        if self.new_ring is not None:
            self.store.replace(keystore.KEYS, keyring.to_json(self.new_ring))
        return self._commit(point, domain, domain_uuid, key.manifest_key())

    def manifest_key(self) -> bytes:
        """The key a rewritten manifest (prune, consolidation) is authenticated with."""
        return self._need_key().manifest_key()

    def _need_key(self) -> SetKey:
        if self.key is None:
            raise errors.KeyRequired(path=self.location, reason=f"the backup set is encrypted: {keystore.HOW}")
        return self.key


def side_names(point: Point) -> list[str]:
    """The side files a point lists (domain XML, checkpoint XML, qemu-img info, boot files)."""
    names = [n for n in (point.domain_xml, point.checkpoint_xml) if n and not n.lstrip().startswith("<")]
    for key in ("qemu_img_info", "boot_files"):
        names += [v for v in dict(point.extra.get(key) or {}).values() if isinstance(v, str)]
    return names


def open_found(store: Store, spec: KeySpec, keyless_ok: bool, cache: dict[str, SetKey]) -> EncryptedSet | None:
    """The encrypted set in ``store`` (the kind's probe, once its key slot file was seen), else None."""
    ring = load_ring(store)
    if ring is None:
        return None
    if keyless_ok and not spec.given:
        return EncryptedSet(store, None)
    return EncryptedSet(store, unlock(store, ring, spec, cache))


def new_chain(store: Store, spec: KeySpec) -> EncryptedSet:
    """A new chain's set with a fresh master key, wrapped by the secret of ``spec`` (saved at commit)."""
    new_ring, master = keyring.create(keystore.require_secret(spec, store.location))
    return EncryptedSet(store, keystore.set_key(new_ring, master), new_ring)


def continue_chain(store: Store, spec: KeySpec, cache: dict[str, SetKey]) -> EncryptedSet:
    """The set an inc/diff of an encrypted chain writes into: unlocked, manifest authenticated."""
    ring = load_ring(store)
    if ring is None:
        raise errors.KeyRequired(path=store.location, reason="the chain's key slot file is missing")
    encrypted = EncryptedSet(store, unlock(store, ring, spec, cache))
    encrypted.manifest()          # authenticates it and checks every point's key fingerprint
    return encrypted
