"""The encryption stage of the frame codec (virtnbd.stream.codec): AEAD per data frame.

Runs after compression. A stream written with it has header flag bit 0 and
``extra["encryption"]`` in its metadata (cipher, set id, key fingerprint, a
random 16-byte salt); each sealed data frame has frame flag bit 0, its payload
is ciphertext + 16-byte tag, and its header checksum field holds xxh3-128 of
that payload (checked without the key; with the key the AEAD tag covers it and the
checksum pass is skipped). Nonce = the frame's disk offset under
a key of this stream alone; associated data = SHA-256 of the stream's metadata
+ the frame header's first 28 bytes (kind, method, flags, offset, length,
stored). Spec: docs/FORMAT.md, "Encryption".
"""
from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import xxhash

from virtnbd import allocator, errors
from virtnbd.crypto import aead
from virtnbd.crypto.setkey import FrameSealer, SetKey
from virtnbd.stream import format as fmt
from virtnbd.stream.codec import Buf, FrameDraft
from virtnbd.stream.format import FrameHeader, StreamMeta

FLAG = 0x1
FIELDS = struct.Struct("<BBHQQQ")          # the frame header's first 28 bytes
META_KEY = "encryption"


def meta_digest_input(meta: StreamMeta) -> bytes:
    return json.dumps(fmt.meta_to_dict(meta), sort_keys=True, separators=(",", ":")).encode()


def with_encryption(meta: StreamMeta, key: SetKey) -> StreamMeta:
    """``meta`` with a fresh ``extra["encryption"]`` record for a stream to be written."""
    record = {"cipher": key.cipher, "set_id": key.set_id, "fingerprint": key.fingerprint,
              "salt": os.urandom(16).hex()}
    extra = MappingProxyType({**dict(meta.extra), META_KEY: record})
    return StreamMeta(**{**{k: getattr(meta, k) for k in fmt.META_KEYS}, "extra": extra})


def record_of(meta: StreamMeta, path: str) -> Mapping[str, Any]:
    record = meta.extra.get(META_KEY)
    if not isinstance(record, Mapping) or not all(isinstance(record.get(k), str)
                                                  for k in ("cipher", "set_id", "fingerprint", "salt")):
        raise errors.FormatError(path=path, offset=fmt.HEADER.size, reason="encrypted stream without a valid "
                                                                           "encryption record")
    return record


class SealStage:
    """Encrypt/decrypt one stream's frames; unbound (per set) until :meth:`bind` (per stream).

    Without a key (``key=None``) decode checks the ciphertext's checksum only and
    returns None (the frame stays opaque): verify without the key."""

    name = "aead"
    frame_flag = FLAG
    header_flag = FLAG
    replaces_checksum = True
    decodes_in_place = True        # a writable payload is decrypted into itself (codec.py, "Performance")
    encode_in_pool = True          # ~0.4 ms of CPU per MiB: the backup encodes every frame in its pool

    def __init__(self, key: SetKey | None, sealer: FrameSealer | None = None) -> None:
        self.key = key
        self.sealer = sealer

    def bind(self, meta: StreamMeta, path: str) -> SealStage:
        record = record_of(meta, path)
        if self.key is None:
            return self
        if record["set_id"] != self.key.set_id or record["fingerprint"] != self.key.fingerprint:
            raise errors.WrongKey(path=path, reason=f"stream encrypted for set {record['set_id']} with key "
                                                    f"{record['fingerprint']}, not this set's "
                                                    f"({self.key.set_id}, {self.key.fingerprint})")
        if record["cipher"] != self.key.cipher:
            raise errors.FormatError(path=path, offset=fmt.HEADER.size, reason="stream cipher differs from the set's")
        try:
            salt = bytes.fromhex(record["salt"])
        except ValueError as err:
            raise errors.FormatError(path=path, offset=fmt.HEADER.size, reason="bad encryption salt") from err
        return SealStage(self.key, self.key.frames(salt, meta_digest_input(meta)))

    def encode(self, frame: FrameDraft, data: Buf) -> Buf:
        """Seal into a new buffer, or in place into the caller's buffer when it gave it up
        (``frame.owned``, writable: the backup's read buffer); the tag then goes to ``frame.tail``."""
        if self.sealer is None:
            raise errors.UsageError(reason="encryption stage used before bind()")
        frame.flags |= FLAG
        fields = FIELDS.pack(fmt.KIND_DATA, frame.method, frame.flags, frame.offset, frame.length,
                             len(data) + aead.TAG_SIZE)
        view = memoryview(data)
        if frame.owned and not view.readonly:
            frame.tail = self.sealer.seal_into(frame.offset, fields, view, out=view)
            hasher = xxhash.xxh3_128(view)
            hasher.update(frame.tail)
            frame.checksum = hasher.digest()
            return view
        sealed = self.sealer.seal(frame.offset, fields, data)
        frame.checksum = fmt.checksum(sealed)
        return sealed

    def decode(self, head: FrameHeader, data: Buf, path: str, pos: int) -> Buf | None:
        if not head.flags & FLAG:
            raise errors.FormatError(path=path, offset=pos, reason="unencrypted frame in an encrypted stream")
        if self.sealer is None:             # without the key: the ciphertext's checksum is all we can check
            if fmt.checksum(data) != head.checksum:
                raise errors.FormatError(path=path, offset=pos, reason="ciphertext checksum mismatch")
            return None
        # with the key the AEAD tag covers the ciphertext (a second pass of xxh3 over it would only cost time);
        # the checksum field itself is covered by the header's own check. A writable payload (the reader's
        # batch buffer) is decrypted in place.
        view = memoryview(data)
        if len(view) < aead.TAG_SIZE:
            raise errors.FormatError(path=path, offset=pos, reason="encrypted frame payload shorter than its tag")
        body = view[:-aead.TAG_SIZE]
        out = body if not view.readonly else allocator.uninitialized(len(body))   # filled by open_into
        try:
            self.sealer.open_into(head.offset, head.raw[:FIELDS.size], body, bytes(view[-aead.TAG_SIZE:]), out=out)
        except aead.AuthenticationFailed as err:
            raise errors.FormatError(path=path, offset=pos, reason="frame does not authenticate (altered, moved "
                                                                   "or from another stream or set)") from err
        return out
