"""AEAD primitives: AES-256-GCM (AES-NI) or ChaCha20-Poly1305, HKDF subkeys, HMAC.

Everything goes through the ``cryptography`` package (OpenSSL). AES-GCM uses the
streaming ``Cipher`` API with ``update_into`` into a caller-sized buffer: it
releases the GIL for the whole frame and copies nothing (the one-shot
``AESGCM`` class of python3-cryptography 38 allocates, zeroes and copies three
times: 0.66 GB/s against 2.4 GB/s per core here).
"""
from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

AES_GCM = "aes-256-gcm"
CHACHA = "chacha20-poly1305"
CIPHERS = (AES_GCM, CHACHA)
KEY_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16
_SLACK = 15           # update_into wants len(data) + block size - 1 bytes of room


class AuthenticationFailed(Exception):
    """The tag did not verify (wrong key, wrong context or damaged bytes). Callers turn it into
    an errors.* class that names the file."""


def has_aes_ni(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True when the CPU advertises the AES instructions (x86 flag ``aes``, arm ``aes``)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith(("flags", "Features")) and "aes" in line.split(":", 1)[-1].split():
            return True
    return False


def default_cipher() -> str:
    return AES_GCM if has_aes_ni() else CHACHA


def subkey(master: bytes, salt: bytes, info: bytes) -> bytes:
    """HKDF-SHA256: one 32-byte key for one purpose (``info``) and one object (``salt``)."""
    return HKDF(algorithm=hashes.SHA256(), length=KEY_SIZE, salt=salt, info=info).derive(master)


def mac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


def mac_ok(key: bytes, data: bytes, tag: bytes) -> bool:
    return hmac.compare_digest(mac(key, data)[:len(tag)], tag) and len(tag) >= 16


def nonce_for(number: int) -> bytes:
    """96-bit nonce from a number unique under one key (a frame's disk offset)."""
    return number.to_bytes(NONCE_SIZE, "little")


def seal(cipher: str, key: bytes, nonce: bytes, data: bytes | memoryview, ad: bytes) -> bytearray | memoryview:
    """Ciphertext followed by the 16-byte tag (a view: trimming the buffer would cost a copy)."""
    if cipher == AES_GCM:
        enc = Cipher(algorithms.AES(key), modes.GCM(nonce)).encryptor()
        enc.authenticate_additional_data(ad)
        out = bytearray(len(data) + TAG_SIZE + _SLACK)
        done = enc.update_into(data, out)  # type: ignore[arg-type]  # any buffer works
        enc.finalize()
        out[done:done + TAG_SIZE] = enc.tag
        return memoryview(out)[:done + TAG_SIZE]
    return bytearray(ChaCha20Poly1305(key).encrypt(nonce, bytes(data), ad))


def open_(cipher: str, key: bytes, nonce: bytes, sealed: bytes | memoryview, ad: bytes) -> bytearray | memoryview:
    """The plaintext of ``seal``'s output; AuthenticationFailed when anything differs."""
    if len(sealed) < TAG_SIZE:
        raise AuthenticationFailed("shorter than a tag")
    view = memoryview(sealed)
    try:
        if cipher == AES_GCM:
            dec = Cipher(algorithms.AES(key), modes.GCM(nonce, bytes(view[-TAG_SIZE:]))).decryptor()
            dec.authenticate_additional_data(ad)
            out = bytearray(len(view) - TAG_SIZE + _SLACK)
            done = dec.update_into(view[:-TAG_SIZE], out)  # type: ignore[arg-type]
            dec.finalize()
            return memoryview(out)[:done]
        return bytearray(ChaCha20Poly1305(key).decrypt(nonce, bytes(view), ad))
    except InvalidTag as err:
        raise AuthenticationFailed("tag mismatch") from err


def check_cipher(name: object) -> str:
    if not isinstance(name, str) or name not in CIPHERS:
        raise ValueError(f"unknown cipher {name!r}")
    return name
