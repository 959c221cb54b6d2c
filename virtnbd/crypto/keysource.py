"""Where a secret comes from: a key file, a passphrase file or the environment.

Never from the command line: the options carry file names only, and the
environment variables ``VIRTNBD_KEY_FILE`` (a path) and ``VIRTNBD_PASSPHRASE``
(the passphrase itself, for timers that get it from a credential store). A key
file holds exactly 32 random bytes (``head -c 32 /dev/urandom > key; chmod 600
key``); key and passphrase files readable by group or others are refused.
"""
from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field

from virtnbd import errors

KEYFILE = "keyfile"
PASSPHRASE = "passphrase"
ENV_KEY_FILE = "VIRTNBD_KEY_FILE"
ENV_PASSPHRASE = "VIRTNBD_PASSPHRASE"
ENV_NEW_KEY_FILE = "VIRTNBD_NEW_KEY_FILE"
ENV_NEW_PASSPHRASE = "VIRTNBD_NEW_PASSPHRASE"
MAX_PASSPHRASE = 4096
KEY_SIZE = 32                # bytes of a key file (and of every AEAD key: crypto/aead.py)


@dataclass(frozen=True)
class KeySpec:
    """What the user named (no secret): built by the command line, read by :func:`load`."""

    key_file: str | None = None
    passphrase_file: str | None = None
    env_passphrase: bool = False        # take VIRTNBD_PASSPHRASE (or the NEW_ variable)

    @property
    def given(self) -> bool:
        return bool(self.key_file or self.passphrase_file or self.env_passphrase)


@dataclass(frozen=True)
class Secret:
    kind: str                                   # KEYFILE | PASSPHRASE
    origin: str                                 # file name or variable name, for messages
    value: bytes = field(repr=False)


def spec_from(key_file: str | None, passphrase_file: str | None,
              environ: Mapping[str, str] | None = None, new: bool = False) -> KeySpec:
    """The command line's choice, else the environment's; one source at most."""
    env = os.environ if environ is None else environ
    if key_file and passphrase_file:
        raise errors.UsageError(reason="--key-file and --passphrase-file exclude each other")
    if key_file or passphrase_file:
        return KeySpec(key_file=key_file, passphrase_file=passphrase_file)
    file_var, pass_var = (ENV_NEW_KEY_FILE, ENV_NEW_PASSPHRASE) if new else (ENV_KEY_FILE, ENV_PASSPHRASE)
    if env.get(file_var) and env.get(pass_var):
        raise errors.UsageError(reason=f"{file_var} and {pass_var} are both set: keep one")
    if env.get(file_var):
        return KeySpec(key_file=env[file_var])
    return KeySpec(env_passphrase=bool(env.get(pass_var)))


def _read_private(path: str, what: str) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as err:
        raise errors.KeyRequired(path=path, reason=f"cannot open the {what}: {err.strerror}") from err
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise errors.EncryptionError(path=path, reason=f"the {what} is not a regular file")
        if st.st_mode & 0o077:
            raise errors.EncryptionError(path=path, reason=f"the {what} is readable by group or others "
                                                           f"(mode {stat.S_IMODE(st.st_mode):04o}): chmod 600 it")
        return os.read(fd, MAX_PASSPHRASE + 2)
    finally:
        os.close(fd)


def _passphrase(raw: bytes, origin: str) -> Secret:
    text = raw[:-1] if raw.endswith(b"\n") else raw
    text = text[:-1] if text.endswith(b"\r") else text
    if not text:
        raise errors.EncryptionError(path=origin, reason="the passphrase is empty")
    if len(text) > MAX_PASSPHRASE:
        raise errors.EncryptionError(path=origin, reason=f"the passphrase is longer than {MAX_PASSPHRASE} bytes")
    return Secret(PASSPHRASE, origin, text)


def load(spec: KeySpec, environ: Mapping[str, str] | None = None, new: bool = False) -> Secret | None:
    """The secret ``spec`` names, or None when it names none."""
    if spec.key_file:
        raw = _read_private(spec.key_file, "key file")
        if len(raw) != KEY_SIZE:
            raise errors.EncryptionError(path=spec.key_file, reason=f"a key file holds exactly {KEY_SIZE} "
                                                                    f"random bytes, this one {len(raw)}")
        return Secret(KEYFILE, spec.key_file, raw)
    if spec.passphrase_file:
        return _passphrase(_read_private(spec.passphrase_file, "passphrase file"), spec.passphrase_file)
    if spec.env_passphrase:
        env = os.environ if environ is None else environ
        var = ENV_NEW_PASSPHRASE if new else ENV_PASSPHRASE
        return _passphrase(env.get(var, "").encode(), var)
    return None


def create_key_file(path: str) -> None:
    """Write 32 random bytes to a new file, mode 0600 (refuses to overwrite)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as err:
        raise errors.StorageError(path=path, reason=err.strerror or str(err)) from err
    with os.fdopen(fd, "wb") as f:
        f.write(os.urandom(KEY_SIZE))
        f.flush()
        os.fsync(f.fileno())
