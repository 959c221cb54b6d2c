"""Key slots in the style of restic: one random master key per backup set, wrapped by slots.

Each slot wraps the 32-byte master key with a key derived from one secret:
a key file (HKDF-SHA256: the file already holds 32 random bytes) or a
passphrase (scrypt, memory-hard). Adding, removing a slot or changing a
passphrase rewrites this small file only, never data. The master key's
fingerprint (HMAC-SHA256 of a constant under the key, first 16 bytes) is
safe to publish: it names the key without revealing it. Spec: docs/FORMAT.md.
"""
from __future__ import annotations

import json
import os
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from virtnbd import errors
from virtnbd.crypto import aead
from virtnbd.crypto.keysource import KEYFILE, PASSPHRASE, Secret

FORMAT_NAME = "virtnbd-keys"
FORMAT_VERSION = 1
SCRYPT_N = 1 << 16          # 64 MiB, ~0.2 s here
SCRYPT_R = 8
SCRYPT_P = 1
MAX_SCRYPT_N = 1 << 22
FINGERPRINT_INFO = b"virtnbd key fingerprint v1"
SLOT_AD = b"virtnbd key slot v1\0"


@dataclass(frozen=True)
class Slot:
    id: str                      # 8 hex digits
    kind: str                    # "keyfile" | "passphrase"
    created: str                 # ISO 8601
    kdf: Mapping[str, Any]       # {"name": "hkdf-sha256", "salt"} | {"name": "scrypt", "n", "r", "p", "salt"}
    nonce: str                   # hex, 12 bytes
    wrapped: str                 # hex, master key sealed (48 bytes)


@dataclass(frozen=True)
class Keyring:
    set_id: str                  # hex, 16 random bytes: names the set in every AEAD context
    cipher: str                  # "aes-256-gcm" | "chacha20-poly1305": frames and slots
    fingerprint: str             # hex of the master key's fingerprint
    slots: tuple[Slot, ...]

    def slot(self, slot_id: str) -> Slot | None:
        return next((s for s in self.slots if s.id == slot_id), None)


def fingerprint(master: bytes) -> str:
    return aead.mac(master, FINGERPRINT_INFO)[:16].hex()


def _now() -> str:
    return datetime.now(UTC).astimezone().isoformat(timespec="seconds")


def _kdf_params(kind: str, scrypt_n: int) -> dict[str, Any]:
    salt = secrets.token_hex(16)
    if kind == KEYFILE:
        return {"name": "hkdf-sha256", "salt": salt}
    return {"name": "scrypt", "n": scrypt_n, "r": SCRYPT_R, "p": SCRYPT_P, "salt": salt}


def _derive(secret: Secret, kdf: Mapping[str, Any]) -> bytes:
    """The wrapping key; ValueError/TypeError/KeyError when ``kdf`` is malformed."""
    salt = bytes.fromhex(kdf["salt"])
    if kdf["name"] == "hkdf-sha256" and secret.kind == KEYFILE:
        return aead.subkey(secret.value, salt, b"virtnbd key file slot v1")
    if kdf["name"] == "scrypt" and secret.kind == PASSPHRASE:
        n, r, p = (int(kdf[k]) for k in ("n", "r", "p"))
        if not (2 <= n <= MAX_SCRYPT_N and n & (n - 1) == 0 and 1 <= r <= 32 and 1 <= p <= 16):
            raise ValueError("scrypt parameters out of range")
        return Scrypt(salt=salt, length=aead.KEY_SIZE, n=n, r=r, p=p).derive(secret.value)
    raise ValueError(f"kdf {kdf['name']!r} does not fit a {secret.kind}")


def _slot_ad(ring: Keyring, slot_id: str, kind: str, kdf: Mapping[str, Any]) -> bytes:
    params = json.dumps(dict(kdf), sort_keys=True, separators=(",", ":")).encode()
    return b"\0".join((SLOT_AD, bytes.fromhex(ring.set_id), ring.cipher.encode(), slot_id.encode(),
                       kind.encode(), params))


def _wrap(ring: Keyring, master: bytes, secret: Secret, scrypt_n: int) -> Slot:
    slot_id = secrets.token_hex(4)
    while ring.slot(slot_id) is not None:
        slot_id = secrets.token_hex(4)
    kdf = MappingProxyType(_kdf_params(secret.kind, scrypt_n))
    nonce = os.urandom(aead.NONCE_SIZE)
    sealed = aead.seal(ring.cipher, _derive(secret, kdf), nonce, master, _slot_ad(ring, slot_id, secret.kind, kdf))
    return Slot(slot_id, secret.kind, _now(), kdf, nonce.hex(), bytes(sealed).hex())


def create(secret: Secret, cipher: str | None = None, scrypt_n: int = SCRYPT_N) -> tuple[Keyring, bytes]:
    """A new master key and a keyring with one slot for ``secret``."""
    master = os.urandom(aead.KEY_SIZE)
    ring = Keyring(secrets.token_hex(16), aead.check_cipher(cipher or aead.default_cipher()),
                   fingerprint(master), ())
    return replace(ring, slots=(_wrap(ring, master, secret, scrypt_n),)), master


def add_slot(ring: Keyring, master: bytes, secret: Secret, scrypt_n: int = SCRYPT_N) -> tuple[Keyring, Slot]:
    slot = _wrap(ring, master, secret, scrypt_n)
    return replace(ring, slots=(*ring.slots, slot)), slot


def remove_slot(ring: Keyring, slot_id: str, path: str) -> Keyring:
    if ring.slot(slot_id) is None:
        raise errors.EncryptionError(path=path, reason=f"no key slot {slot_id}")
    if len(ring.slots) == 1:
        raise errors.EncryptionError(path=path, reason="refusing to remove the last key slot (the set would be "
                                                       "unreadable for good)")
    return replace(ring, slots=tuple(s for s in ring.slots if s.id != slot_id))


def _try(ring: Keyring, slot: Slot, secret: Secret, path: str) -> bytes | None:
    try:
        key = _derive(secret, slot.kdf)
        master = aead.open_(ring.cipher, key, bytes.fromhex(slot.nonce), bytes.fromhex(slot.wrapped),
                            _slot_ad(ring, slot.id, slot.kind, slot.kdf))
    except aead.AuthenticationFailed:
        return None
    except (ValueError, TypeError, KeyError) as err:
        raise errors.EncryptionError(path=path, reason=f"key slot {slot.id} is damaged ({err})") from err
    if fingerprint(bytes(master)) != ring.fingerprint:
        raise errors.EncryptionError(path=path, reason=f"key slot {slot.id} opens a key whose fingerprint is not "
                                                       f"the set's (damaged key slot file)")
    return bytes(master)


def unlock(ring: Keyring, secret: Secret, path: str) -> tuple[bytes, Slot]:
    """The master key and the slot that opened it; WrongKey when no slot opens."""
    kinds = [s for s in ring.slots if s.kind == secret.kind]
    if not kinds:
        raise errors.WrongKey(path=path, reason=f"the set has no {secret.kind} key slot ({secret.origin} cannot "
                                                f"open it)")
    for slot in kinds:
        master = _try(ring, slot, secret, path)
        if master is not None:
            return master, slot
    raise errors.WrongKey(path=path, reason=f"wrong key: no {secret.kind} key slot opens with {secret.origin} "
                                            f"(or the slot is damaged)")


# -- JSON ---------------------------------------------------------------------------

def to_json(ring: Keyring) -> bytes:
    doc = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "set_id": ring.set_id, "cipher": ring.cipher,
           "fingerprint": ring.fingerprint,
           "slots": [{"id": s.id, "kind": s.kind, "created": s.created, "kdf": dict(s.kdf), "nonce": s.nonce,
                      "wrapped": s.wrapped} for s in ring.slots]}
    return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()


def _hex(value: Any, size: int, what: str) -> str:
    if not isinstance(value, str) or len(value) != 2 * size:
        raise ValueError(f"{what} is not {size} bytes of hex")
    bytes.fromhex(value)
    return value


def _slot_from(obj: Any) -> Slot:
    if not isinstance(obj, dict) or obj.get("kind") not in (KEYFILE, PASSPHRASE) \
            or not isinstance(obj.get("kdf"), dict):
        raise ValueError("slot is not an object with kind and kdf")
    return Slot(_hex(obj.get("id"), 4, "slot id"), obj["kind"], str(obj.get("created", "")),
                MappingProxyType(dict(obj["kdf"])), _hex(obj.get("nonce"), aead.NONCE_SIZE, "nonce"),
                _hex(obj.get("wrapped"), aead.KEY_SIZE + aead.TAG_SIZE, "wrapped key"))


def from_json(data: bytes, path: str) -> Keyring:
    try:
        doc = json.loads(data.decode())
        if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
            raise ValueError("not a virtnbd key slot file")
        if doc.get("version") != FORMAT_VERSION:
            raise ValueError(f"unsupported version {doc.get('version')!r}")
        slots: Sequence[Any] = doc.get("slots") or []
        ring = Keyring(_hex(doc.get("set_id"), 16, "set_id"), aead.check_cipher(doc.get("cipher")),
                       _hex(doc.get("fingerprint"), 16, "fingerprint"), tuple(_slot_from(s) for s in slots))
    except (ValueError, TypeError, UnicodeDecodeError) as err:
        raise errors.EncryptionError(path=path, reason=f"key slot file damaged: {err}") from err
    if not ring.slots:
        raise errors.EncryptionError(path=path, reason="key slot file damaged: no key slots")
    return ring
