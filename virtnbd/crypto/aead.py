"""AEAD primitives: AES-256-GCM (AES-NI) or ChaCha20-Poly1305, HKDF subkeys, HMAC.

Everything goes through the ``cryptography`` package (OpenSSL). Per frame the
data is encrypted and decrypted *into a caller's buffer* (``seal_into`` /
``open_into``; the buffer may be the input itself: in place, no copy):

* fast path: the OpenSSL EVP functions of cryptography's own binding
  (``cryptography.hazmat.bindings.openssl.binding.Binding``) with one cipher
  context per thread and key, re-initialised per frame with the new nonce only:
  the key schedule is computed once, the GIL is released for the whole frame
  and nothing is allocated per frame. The public ``Cipher`` API builds a new
  context per call (about 50 us of Python per frame, under the GIL: 12 % of a
  1 MiB frame's decryption here) and the one-shot ``AESGCM`` class of
  python3-cryptography 38 allocates, zeroes and copies three times;
* fallback (a cryptography without those binding functions): the public
  ``Cipher`` API with ``update_into`` (AES-GCM) or the one-shot
  ``ChaCha20Poly1305`` class. Both paths produce the same bytes
  (tests/unit/test_crypto.py checks them against the one-shot classes).
"""
from __future__ import annotations

import hashlib
import hmac
import os
import threading
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from virtnbd.crypto.keysource import KEY_SIZE

AES_GCM = "aes-256-gcm"
CHACHA = "chacha20-poly1305"
CIPHERS = (AES_GCM, CHACHA)
NONCE_SIZE = 12
TAG_SIZE = 16
_SLACK = 15           # update_into wants len(data) + block size - 1 bytes of room
Buf = bytes | bytearray | memoryview


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


def seal_into(cipher: str, key: bytes, nonce: bytes, data: Buf, ad: bytes, *, out: Buf) -> bytes:
    """Encrypt ``data`` into ``out[:len(data)]`` (``out`` may be ``data``: in place); return the tag."""
    ctx = _evp.context(cipher, key) if _evp is not None else None
    if ctx is not None:
        return _evp.seal(ctx, nonce, data, ad, out=out)  # type: ignore[union-attr]
    sealed = _fallback_seal(cipher, key, nonce, data, ad)
    memoryview(out)[:len(data)] = sealed[:len(data)]
    return bytes(sealed[len(data):])


def open_into(cipher: str, key: bytes, nonce: bytes, data: Buf, tag: bytes, *, ad: bytes, out: Buf) -> None:
    """Decrypt ``data`` into ``out[:len(data)]`` (may be ``data``: in place) and check ``tag``;
    AuthenticationFailed when anything differs (``out`` then holds garbage)."""
    ctx = _evp.context(cipher, key) if _evp is not None else None
    if ctx is not None:
        _evp.open(ctx, nonce, data, tag, ad=ad, out=out)  # type: ignore[union-attr]
        return
    plain = _fallback_open(cipher, key, nonce, bytes(data) + tag, ad)
    memoryview(out)[:len(data)] = plain


def seal(cipher: str, key: bytes, nonce: bytes, data: Buf, ad: bytes) -> bytearray:
    """Ciphertext followed by the 16-byte tag, in a new buffer."""
    out = bytearray(len(data) + TAG_SIZE)
    out[len(data):] = seal_into(cipher, key, nonce, data, ad, out=out)
    return out


def open_(cipher: str, key: bytes, nonce: bytes, sealed: Buf, ad: bytes) -> bytearray:
    """The plaintext of ``seal``'s output, in a new buffer; AuthenticationFailed when anything differs."""
    if len(sealed) < TAG_SIZE:
        raise AuthenticationFailed("shorter than a tag")
    view = memoryview(sealed)
    out = bytearray(len(view) - TAG_SIZE)
    open_into(cipher, key, nonce, view[:-TAG_SIZE], bytes(view[-TAG_SIZE:]), ad=ad, out=out)
    return out


def _fallback_seal(cipher: str, key: bytes, nonce: bytes, data: Buf, ad: bytes) -> Buf:
    if cipher == AES_GCM:
        enc = Cipher(algorithms.AES(key), modes.GCM(nonce)).encryptor()
        enc.authenticate_additional_data(ad)
        out = bytearray(len(data) + TAG_SIZE + _SLACK)
        done = enc.update_into(data, out)  # type: ignore[arg-type]  # any buffer works
        enc.finalize()
        out[done:done + TAG_SIZE] = enc.tag
        return memoryview(out)[:done + TAG_SIZE]
    return ChaCha20Poly1305(key).encrypt(nonce, bytes(data), ad)


def _fallback_open(cipher: str, key: bytes, nonce: bytes, sealed: bytes, ad: bytes) -> Buf:
    view = memoryview(sealed)
    try:
        if cipher == AES_GCM:
            dec = Cipher(algorithms.AES(key), modes.GCM(nonce, bytes(view[-TAG_SIZE:]))).decryptor()
            dec.authenticate_additional_data(ad)
            out = bytearray(len(view) - TAG_SIZE + _SLACK)
            done = dec.update_into(view[:-TAG_SIZE], out)  # type: ignore[arg-type]
            dec.finalize()
            return memoryview(out)[:done]
        return ChaCha20Poly1305(key).decrypt(nonce, sealed, ad)
    except InvalidTag as err:
        raise AuthenticationFailed("tag mismatch") from err


class _Evp:
    """OpenSSL EVP AEAD contexts, one per thread and key (a small cache per thread)."""

    NAMES = {AES_GCM: b"aes-256-gcm", CHACHA: b"chacha20-poly1305"}
    PER_THREAD = 16

    def __init__(self, ffi: Any, lib: Any) -> None:
        self.ffi = ffi
        self.lib = lib
        self.local = threading.local()
        self.ciphers = {name: lib.EVP_get_cipherbyname(evp) for name, evp in self.NAMES.items()}

    def context(self, cipher: str, key: bytes) -> Any:
        cache: dict[tuple[str, bytes], Any] | None = getattr(self.local, "ctx", None)
        if cache is None:
            cache = self.local.ctx = {}
        ctx = cache.get((cipher, key))
        if ctx is None:
            evp = self.ciphers.get(cipher)
            if evp is None or evp == self.ffi.NULL or len(key) != KEY_SIZE:
                return None
            ctx = self._new(evp, key)
            if len(cache) >= self.PER_THREAD:
                cache.pop(next(iter(cache)))
            cache[(cipher, key)] = ctx
        return ctx

    def _new(self, evp: Any, key: bytes) -> Any:
        lib, null = self.lib, self.ffi.NULL
        ctx = self.ffi.gc(lib.EVP_CIPHER_CTX_new(), lib.EVP_CIPHER_CTX_free)
        ok = (ctx != null and lib.EVP_CipherInit_ex(ctx, evp, null, null, null, 1) == 1
              and lib.EVP_CIPHER_CTX_ctrl(ctx, lib.EVP_CTRL_AEAD_SET_IVLEN, NONCE_SIZE, null) == 1
              and lib.EVP_CipherInit_ex(ctx, null, null, key, null, 1) == 1)
        if not ok:
            lib.ERR_clear_error()
            raise RuntimeError("OpenSSL could not set up the AEAD cipher context")
        return ctx

    def _run(self, ctx: Any, nonce: bytes, data: Buf, ad: bytes, *, out: Buf, enc: int, tag: bytes | None) -> bool:
        lib, ffi = self.lib, self.ffi
        n = len(data)
        if len(out) < n or len(nonce) != NONCE_SIZE:
            raise ValueError("AEAD output buffer too small or bad nonce")
        outlen = ffi.new("int *")
        ok = lib.EVP_CipherInit_ex(ctx, ffi.NULL, ffi.NULL, ffi.NULL, nonce, enc) == 1
        if ok and tag is not None:
            ok = lib.EVP_CIPHER_CTX_ctrl(ctx, lib.EVP_CTRL_AEAD_SET_TAG, TAG_SIZE, tag) == 1
        ok = ok and lib.EVP_CipherUpdate(ctx, ffi.NULL, outlen, ad, len(ad)) == 1
        if ok and n:
            ok = lib.EVP_CipherUpdate(ctx, ffi.from_buffer(out, require_writable=True), outlen,
                                      ffi.from_buffer(data), n) == 1 and outlen[0] == n
        ok = ok and lib.EVP_CipherFinal_ex(ctx, ffi.new("unsigned char[]", 32), outlen) == 1   # AEAD: writes nothing
        if not ok:
            lib.ERR_clear_error()
        return ok

    def seal(self, ctx: Any, nonce: bytes, data: Buf, ad: bytes, *, out: Buf) -> bytes:
        tag = self.ffi.new("unsigned char[]", TAG_SIZE)
        if (not self._run(ctx, nonce, data, ad, out=out, enc=1, tag=None)
                or self.lib.EVP_CIPHER_CTX_ctrl(ctx, self.lib.EVP_CTRL_AEAD_GET_TAG, TAG_SIZE, tag) != 1):
            self.lib.ERR_clear_error()
            raise RuntimeError("OpenSSL AEAD encryption failed")
        return bytes(self.ffi.buffer(tag))

    def open(self, ctx: Any, nonce: bytes, data: Buf, tag: bytes, *, ad: bytes, out: Buf) -> None:
        if len(tag) != TAG_SIZE or not self._run(ctx, nonce, data, ad, out=out, enc=0, tag=tag):
            raise AuthenticationFailed("tag mismatch")


def _load_evp() -> _Evp | None:
    """The fast path when cryptography's binding has the EVP functions it needs (python3-cryptography 38)."""
    try:
        from cryptography.hazmat.bindings.openssl.binding import Binding  # noqa: PLC0415
        binding = Binding()
        lib = binding.lib
        for name in ("EVP_CIPHER_CTX_new", "EVP_CIPHER_CTX_free", "EVP_CipherInit_ex", "EVP_CIPHER_CTX_ctrl",
                     "EVP_CipherUpdate", "EVP_CipherFinal_ex", "EVP_get_cipherbyname", "ERR_clear_error",
                     "EVP_CTRL_AEAD_SET_IVLEN", "EVP_CTRL_AEAD_SET_TAG", "EVP_CTRL_AEAD_GET_TAG"):
            getattr(lib, name)
        return _Evp(binding.ffi, lib)
    except (ImportError, AttributeError):
        return None


_evp = None if os.environ.get("VIRTNBD_AEAD_FALLBACK") else _load_evp()


def check_cipher(name: object) -> str:
    if not isinstance(name, str) or name not in CIPHERS:
        raise ValueError(f"unknown cipher {name!r}")
    return name
