"""Key sources, key slots, AEAD and sealed objects (virtnbd.crypto)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from virtnbd import errors
from virtnbd.crypto import aead, keyring, keysource, store
from virtnbd.crypto.keysource import KeySpec, Secret
from virtnbd.crypto.setkey import SetKey

FAST_N = 1 << 10     # scrypt cost for tests (the default is 1 << 16)


def _key_file(tmp_path: Path, name: str = "key", mode: int = 0o600) -> str:
    path = tmp_path / name
    keysource.create_key_file(str(path))
    path.chmod(mode)
    return str(path)


def _pass_file(tmp_path: Path, text: str, name: str = "pass") -> str:
    path = tmp_path / name
    path.write_text(text + "\n")
    path.chmod(0o600)
    return str(path)


# -- key sources ----------------------------------------------------------------------

def test_key_file_is_32_private_bytes(tmp_path: Path) -> None:
    path = _key_file(tmp_path)
    assert os.stat(path).st_mode & 0o777 == 0o600
    secret = keysource.load(KeySpec(key_file=path))
    assert secret is not None and secret.kind == "keyfile" and len(secret.value) == 32
    assert secret.value.hex() not in repr(secret)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644])
def test_key_file_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = _key_file(tmp_path, mode=mode)
    with pytest.raises(errors.EncryptionError, match="readable by group or others"):
        keysource.load(KeySpec(key_file=path))


def test_key_file_of_wrong_size_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "short"
    path.write_bytes(b"x" * 31)
    path.chmod(0o600)
    with pytest.raises(errors.EncryptionError, match="exactly 32"):
        keysource.load(KeySpec(key_file=str(path)))


def test_missing_key_file_is_one_error(tmp_path: Path) -> None:
    with pytest.raises(errors.KeyRequired, match="cannot open the key file"):
        keysource.load(KeySpec(key_file=str(tmp_path / "nope")))


def test_passphrase_file_strips_one_newline(tmp_path: Path) -> None:
    secret = keysource.load(KeySpec(passphrase_file=_pass_file(tmp_path, "correct horse ")))
    assert secret is not None and secret.value == b"correct horse "


def test_empty_passphrase_refused(tmp_path: Path) -> None:
    with pytest.raises(errors.EncryptionError, match="empty"):
        keysource.load(KeySpec(passphrase_file=_pass_file(tmp_path, "")))


def test_environment_sources() -> None:
    env = {"VIRTNBD_PASSPHRASE": "pw"}
    spec = keysource.spec_from(None, None, env)
    assert spec.env_passphrase and spec.given
    secret = keysource.load(spec, env)
    assert secret is not None and secret.value == b"pw" and secret.origin == "VIRTNBD_PASSPHRASE"
    assert keysource.spec_from(None, None, {"VIRTNBD_KEY_FILE": "/k"}).key_file == "/k"
    assert keysource.spec_from("/cli", None, {"VIRTNBD_KEY_FILE": "/k"}).key_file == "/cli"
    assert not keysource.spec_from(None, None, {}).given
    with pytest.raises(errors.UsageError):
        keysource.spec_from(None, None, {"VIRTNBD_KEY_FILE": "/k", "VIRTNBD_PASSPHRASE": "x"})
    with pytest.raises(errors.UsageError):
        keysource.spec_from("/a", "/b", {})
    new = keysource.spec_from(None, None, {"VIRTNBD_NEW_PASSPHRASE": "n"}, new=True)
    secret = keysource.load(new, {"VIRTNBD_NEW_PASSPHRASE": "n"}, new=True)
    assert secret is not None and secret.value == b"n"


def test_create_key_file_never_overwrites(tmp_path: Path) -> None:
    path = _key_file(tmp_path)
    with pytest.raises(errors.StorageError):
        keysource.create_key_file(path)


# -- AEAD ---------------------------------------------------------------------------------

@pytest.mark.parametrize("cipher", aead.CIPHERS)
def test_seal_open_round_trip_and_tamper(cipher: str) -> None:
    key = os.urandom(32)
    nonce = aead.nonce_for(1 << 20)
    data = os.urandom(70000)
    sealed = bytes(aead.seal(cipher, key, nonce, memoryview(data), b"ad"))
    assert len(sealed) == len(data) + aead.TAG_SIZE and bytes(sealed[:100]) != data[:100]
    assert aead.open_(cipher, key, nonce, sealed, b"ad") == data
    for bad in (
        lambda: aead.open_(cipher, key, nonce, sealed, b"ae"),
        lambda: aead.open_(cipher, key, aead.nonce_for(0), sealed, b"ad"),
        lambda: aead.open_(cipher, os.urandom(32), nonce, sealed, b"ad"),
        lambda: aead.open_(cipher, key, nonce, sealed[:-1] + bytes([sealed[-1] ^ 1]), b"ad"),
        lambda: aead.open_(cipher, key, nonce, bytes([sealed[0] ^ 0x80]) + sealed[1:], b"ad"),
        lambda: aead.open_(cipher, key, nonce, b"short", b"ad"),
    ):
        with pytest.raises(aead.AuthenticationFailed):
            bad()


def test_aes_ni_detection(tmp_path: Path) -> None:
    with_aes = tmp_path / "a"
    with_aes.write_text("processor : 0\nflags\t\t: fpu sse2 aes avx2\n")
    without = tmp_path / "b"
    without.write_text("processor : 0\nflags\t\t: fpu sse2 avx2 aesx\n")
    assert aead.has_aes_ni(str(with_aes))
    assert not aead.has_aes_ni(str(without))
    assert not aead.has_aes_ni(str(tmp_path / "missing"))


# -- key slots ------------------------------------------------------------------------------

def _secret(kind: str, value: bytes) -> Secret:
    return Secret(kind, "test", value)


def test_keyring_slots_add_list_remove_passwd() -> None:
    k1 = _secret("keyfile", os.urandom(32))
    ring, master = keyring.create(k1, scrypt_n=FAST_N)
    assert ring.fingerprint == keyring.fingerprint(master) and len(ring.slots) == 1
    assert master.hex() not in keyring.to_json(ring).decode()
    old = _secret("passphrase", b"old pass")
    ring, old_slot = keyring.add_slot(ring, master, old, scrypt_n=FAST_N)
    assert keyring.unlock(ring, old, "p") == (master, old_slot)
    # passwd = add the new passphrase, remove the slot the old one opened
    new = _secret("passphrase", b"new pass")
    ring, _ = keyring.add_slot(ring, master, new, scrypt_n=FAST_N)
    ring = keyring.remove_slot(ring, old_slot.id, "p")
    ring = keyring.from_json(keyring.to_json(ring), "p")
    assert keyring.unlock(ring, new, "p")[0] == master
    assert keyring.unlock(ring, k1, "p")[0] == master
    with pytest.raises(errors.WrongKey, match="wrong key"):
        keyring.unlock(ring, old, "p")
    with pytest.raises(errors.EncryptionError, match="no key slot"):
        keyring.remove_slot(ring, "00000000", "p")


def test_last_slot_cannot_be_removed() -> None:
    ring, _ = keyring.create(_secret("keyfile", os.urandom(32)), scrypt_n=FAST_N)
    with pytest.raises(errors.EncryptionError, match="last key slot"):
        keyring.remove_slot(ring, ring.slots[0].id, "p")


def test_wrong_kind_and_wrong_key() -> None:
    ring, _ = keyring.create(_secret("keyfile", os.urandom(32)), scrypt_n=FAST_N)
    with pytest.raises(errors.WrongKey, match="no passphrase key slot"):
        keyring.unlock(ring, _secret("passphrase", b"x"), "p")
    with pytest.raises(errors.WrongKey, match="wrong key"):
        keyring.unlock(ring, _secret("keyfile", os.urandom(32)), "p")


def _damage(ring: keyring.Keyring, edit: dict[str, object]) -> bytes:
    doc = json.loads(keyring.to_json(ring))
    doc["slots"][0].update(edit)
    return json.dumps(doc).encode()


def test_damaged_slot_is_one_clear_error() -> None:
    secret = _secret("keyfile", os.urandom(32))
    ring, _ = keyring.create(secret, scrypt_n=FAST_N)
    wrapped = ring.slots[0].wrapped
    flipped = ("0" if wrapped[0] != "0" else "1") + wrapped[1:]
    with pytest.raises(errors.WrongKey):       # AEAD cannot tell a damaged slot from a wrong key
        keyring.unlock(keyring.from_json(_damage(ring, {"wrapped": flipped}), "p"), secret, "p")
    with pytest.raises(errors.EncryptionError, match="damaged"):
        keyring.from_json(_damage(ring, {"nonce": "zz"}), "p")
    with pytest.raises(errors.EncryptionError, match="damaged"):
        keyring.from_json(b"{not json", "p")
    with pytest.raises(errors.EncryptionError, match="damaged"):
        keyring.unlock(keyring.from_json(_damage(ring, {"kdf": {"name": "scrypt"}}), "p"), secret, "p")
    doc = json.loads(keyring.to_json(ring))
    doc["fingerprint"] = "00" * 16
    with pytest.raises(errors.EncryptionError, match="fingerprint"):
        keyring.unlock(keyring.from_json(json.dumps(doc).encode(), "p"), secret, "p")


def test_scrypt_parameters_bounded() -> None:
    secret = _secret("passphrase", b"pw")
    ring, _ = keyring.create(secret, scrypt_n=FAST_N)
    slot = dict(ring.slots[0].kdf)
    slot["n"] = 1 << 30
    with pytest.raises(errors.EncryptionError, match="out of range"):
        keyring.unlock(keyring.from_json(_damage(ring, {"kdf": slot}), "p"), secret, "p")


# -- the set's key file in a folder ---------------------------------------------------------

def test_store_open_key(tmp_path: Path) -> None:
    folder = tmp_path / "set"
    folder.mkdir()
    key_file = _key_file(tmp_path)
    spec = KeySpec(key_file=key_file)
    assert store.open_key(folder, KeySpec()) is None
    with pytest.raises(errors.EncryptionError, match="not encrypted"):
        store.open_key(folder, spec)
    made = store.new_key(spec)
    assert made is not None
    ring, key = made
    store.save_ring(folder, ring)
    assert os.stat(store.keys_path(folder)).st_mode & 0o777 == 0o600
    opened = store.open_key(folder, spec)
    assert opened == key and key.master.hex() not in repr(key)
    with pytest.raises(errors.KeyRequired, match="encrypted"):
        store.open_key(folder, KeySpec())
    with pytest.raises(errors.WrongKey):
        store.open_key(folder, KeySpec(key_file=_key_file(tmp_path, "other")))


# -- sealed objects and frame sealers -------------------------------------------------------

def _set_key() -> SetKey:
    ring, master = keyring.create(_secret("keyfile", os.urandom(32)), scrypt_n=FAST_N)
    return store.set_key(ring, master)


def test_sealed_object_bound_to_name_and_set() -> None:
    key = _set_key()
    blob = key.seal("vmconfig.virtnbdbackup.0.xml", b"<domain>secret</domain>")
    assert b"secret" not in blob
    assert key.unseal("vmconfig.virtnbdbackup.0.xml", blob, "f") == b"<domain>secret</domain>"
    with pytest.raises(errors.FormatError, match="does not authenticate"):
        key.unseal("vmconfig.virtnbdbackup.1.xml", blob, "f")
    with pytest.raises(errors.FormatError, match="does not authenticate"):
        _set_key().unseal("vmconfig.virtnbdbackup.0.xml", blob, "f")
    with pytest.raises(errors.FormatError):
        key.unseal("x", blob[:20], "f")
    assert key.unseal_text("g", key.seal_text("g", b"{}"), "f") == b"{}"


def test_frame_sealer_bound_to_stream_header_and_offset() -> None:
    key = _set_key()
    salt = os.urandom(16)
    one = key.frames(salt, b"header one")
    data = os.urandom(4096)
    sealed = one.seal(4096, b"fields", data)
    assert one.open(4096, b"fields", sealed) == data
    for other, offset, fields in ((key.frames(salt, b"header two"), 4096, b"fields"),
                                  (key.frames(os.urandom(16), b"header one"), 4096, b"fields"),
                                  (one, 8192, b"fields"), (one, 4096, b"fieldz"),
                                  (_set_key().frames(salt, b"header one"), 4096, b"fields")):
        with pytest.raises(aead.AuthenticationFailed):
            other.open(offset, fields, sealed)
    assert one.index_tag(b"x") != key.frames(os.urandom(16), b"header one").index_tag(b"x")


@pytest.mark.parametrize("fallback", [False, True])
@pytest.mark.parametrize("cipher", aead.CIPHERS)
def test_fast_and_fallback_paths_match_the_one_shot_classes_in_place(cipher: str, fallback: bool,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The EVP fast path (one context per thread and key) and the public-API fallback write the
    same bytes as cryptography's one-shot AEAD classes: the frame format does not depend on the path."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305  # noqa: PLC0415
    assert aead._evp is not None                                    # python3-cryptography 38 has the binding
    if fallback:
        monkeypatch.setattr(aead, "_evp", None)
    one_shot = AESGCM if cipher == aead.AES_GCM else ChaCha20Poly1305
    key, data = os.urandom(32), os.urandom(3 * 65536 + 7)
    for n in (0, 1, 1 << 40):                                      # the same context, a new nonce each time
        nonce = aead.nonce_for(n)
        expected = one_shot(key).encrypt(nonce, data, b"ad")
        assert bytes(aead.seal(cipher, key, nonce, data, b"ad")) == expected
        buf = bytearray(data)
        tag = aead.seal_into(cipher, key, nonce, memoryview(buf), b"ad", out=buf)
        assert bytes(buf) + tag == expected
        with pytest.raises(aead.AuthenticationFailed):
            aead.open_into(cipher, key, nonce, memoryview(buf), tag, ad=b"ae", out=bytearray(len(buf)))
        aead.open_into(cipher, key, nonce, memoryview(buf), tag, ad=b"ad", out=buf)   # after a failure: fine
        assert bytes(buf) == data
