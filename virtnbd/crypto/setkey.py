"""The unlocked key of one backup set and the sealers derived from it.

``SetKey`` holds the master key (never logged: ``repr=False``). Every
encrypted object gets its own subkey (HKDF-SHA256 with a random salt stored
next to it and a purpose string that names the set), so nonces need only be
unique within one object:

* a stream's data frames: nonce = the frame's disk offset (frames of a stream
  never overlap), associated data = SHA-256 of the stream header (set id, point,
  disk, level, salt) + the frame header fields;
* a stream's index trailer: HMAC-SHA256 instead of xxh3;
* a sealed side file (domain XML, checkpoint XML, ``qemu-img info``) or field
  (``guest_info``): a fresh subkey, associated data = its name in the set.

Spec: docs/FORMAT.md, "Encryption".
"""
from __future__ import annotations

import base64
import hashlib
import os
import struct
from dataclasses import dataclass, field

from virtnbd import errors
from virtnbd.crypto import aead

SEAL_MAGIC = b"VNBDSEAL"
SEAL_HEAD = struct.Struct("<8sHH16s")        # magic, version, flags, salt
SEAL_VERSION = 1
SALT_SIZE = 16
INDEX_TAG_SIZE = 16
FRAME_INFO = b"virtnbd stream frames v1|"
INDEX_INFO = b"virtnbd stream index v1|"
SEAL_INFO = b"virtnbd sealed object v1|"
MANIFEST_INFO = b"virtnbd manifest mac v1|"


@dataclass(frozen=True)
class SetKey:
    set_id: str
    cipher: str
    fingerprint: str
    master: bytes = field(repr=False)

    def _info(self, purpose: bytes) -> bytes:
        return purpose + self.set_id.encode()

    def frames(self, salt: bytes, header: bytes) -> FrameSealer:
        """The sealer of one stream whose header bytes (with meta, without the check) are ``header``."""
        return FrameSealer(self.cipher, aead.subkey(self.master, salt, self._info(FRAME_INFO)),
                           aead.subkey(self.master, salt, self._info(INDEX_INFO)),
                           hashlib.sha256(header).digest())

    def manifest_key(self) -> bytes:
        return aead.subkey(self.master, b"", self._info(MANIFEST_INFO))

    def seal(self, name: str, data: bytes) -> bytes:
        """A sealed object: 28-byte head (magic, version, flags, salt) + ciphertext + tag."""
        salt = os.urandom(SALT_SIZE)
        head = SEAL_HEAD.pack(SEAL_MAGIC, SEAL_VERSION, 0, salt)
        key = aead.subkey(self.master, salt, self._info(SEAL_INFO))
        return head + bytes(aead.seal(self.cipher, key, bytes(aead.NONCE_SIZE), data, head + name.encode()))

    def unseal(self, name: str, blob: bytes, path: str) -> bytes:
        if len(blob) < SEAL_HEAD.size + aead.TAG_SIZE:
            raise errors.FormatError(path=path, offset=0, reason="sealed object truncated")
        magic, version, flags, salt = SEAL_HEAD.unpack(blob[:SEAL_HEAD.size])
        if magic != SEAL_MAGIC or version != SEAL_VERSION or flags != 0:
            raise errors.FormatError(path=path, offset=0, reason="not a sealed object of this version")
        key = aead.subkey(self.master, salt, self._info(SEAL_INFO))
        try:
            return bytes(aead.open_(self.cipher, key, bytes(aead.NONCE_SIZE), blob[SEAL_HEAD.size:],
                                    blob[:SEAL_HEAD.size] + name.encode()))
        except aead.AuthenticationFailed as err:
            raise errors.FormatError(path=path, offset=SEAL_HEAD.size,
                                     reason=f"sealed {name} does not authenticate (damaged, moved or "
                                            f"another set's)") from err

    def seal_text(self, name: str, data: bytes) -> str:
        return base64.b64encode(self.seal(name, data)).decode()

    def unseal_text(self, name: str, text: str, path: str) -> bytes:
        try:
            blob = base64.b64decode(text.encode(), validate=True)
        except ValueError as err:
            raise errors.FormatError(path=path, offset=0, reason=f"sealed {name} is not base64") from err
        return self.unseal(name, blob, path)


def is_sealed(blob: bytes) -> bool:
    return blob.startswith(SEAL_MAGIC)


@dataclass(frozen=True)
class FrameSealer:
    """Seals and opens the data frames of one stream; thread-safe (no state)."""

    cipher: str
    key: bytes = field(repr=False)
    index_key: bytes = field(repr=False)
    header_digest: bytes

    def ad(self, fields: bytes) -> bytes:
        return self.header_digest + fields

    def seal(self, offset: int, fields: bytes, payload: aead.Buf) -> bytearray:
        return aead.seal(self.cipher, self.key, aead.nonce_for(offset), payload, self.ad(fields))

    def seal_into(self, offset: int, fields: bytes, payload: aead.Buf, *, out: aead.Buf) -> bytes:
        """Ciphertext into ``out`` (may be ``payload``: in place); returns the tag."""
        return aead.seal_into(self.cipher, self.key, aead.nonce_for(offset), payload, self.ad(fields), out=out)

    def open(self, offset: int, fields: bytes, sealed: aead.Buf) -> bytearray:
        """Raises aead.AuthenticationFailed."""
        return aead.open_(self.cipher, self.key, aead.nonce_for(offset), sealed, self.ad(fields))

    def open_into(self, offset: int, fields: bytes, body: aead.Buf, tag: bytes, *, out: aead.Buf) -> None:
        """Plaintext of ``body`` (ciphertext without its tag) into ``out`` (may be ``body``: in place);
        raises aead.AuthenticationFailed."""
        aead.open_into(self.cipher, self.key, aead.nonce_for(offset), body, tag, ad=self.ad(fields), out=out)

    def index_tag(self, data: bytes) -> bytes:
        return aead.mac(self.index_key, self.header_digest + data)[:INDEX_TAG_SIZE]
