"""The backup side of encryption: which key a run uses, and what it seals.

A copy/full into an empty folder with a key starts an encrypted chain (new
master key, saved as the key slot file with the first point). An inc/diff of
an encrypted chain needs a key that opens it, and the key's fingerprint must
be the one every earlier point recorded. Both are decided before anything is
written to the folder.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from virtnbd import errors
from virtnbd.backupset import manifest as bsmanifest
from virtnbd.crypto import store
from virtnbd.crypto.keyring import Keyring
from virtnbd.crypto.keysource import KeySpec
from virtnbd.crypto.setkey import SetKey
from virtnbd.crypto.stage import SealStage, with_encryption
from virtnbd.stream.codec import Stage
from virtnbd.stream.format import StreamMeta

log = logging.getLogger(__name__)
POINT_KEY = "encryption"            # Point.extra record: set_id, cipher, fingerprint


@dataclass(frozen=True)
class BackupCrypt:
    key: SetKey
    new_ring: Keyring | None        # a new chain: saved right before the first point is committed

    def stream(self, meta: StreamMeta, path: str) -> tuple[StreamMeta, tuple[Stage, ...]]:
        sealed = with_encryption(meta, self.key)
        return sealed, (cast(Stage, SealStage(self.key).bind(sealed, path)),)

    def record(self) -> dict[str, str]:
        return {"set_id": self.key.set_id, "cipher": self.key.cipher, "fingerprint": self.key.fingerprint}


def _recorded(manifest: bsmanifest.Manifest | None) -> set[str | None]:
    points = manifest.points if manifest is not None else ()
    return {(p.extra.get(POINT_KEY) or {}).get("fingerprint") for p in points}


def resolve(spec: KeySpec, folder: Path, manifest: bsmanifest.Manifest | None, level: str) -> BackupCrypt | None:
    """The run's key: raises KeyRequired / WrongKey / EncryptionError before anything is written."""
    if level in ("copy", "full") and (manifest is None or not manifest.points):
        made = store.new_key(spec)
        return BackupCrypt(made[1], made[0]) if made is not None else None
    key = store.open_key(folder, spec)
    recorded = _recorded(manifest)
    if key is None:
        if recorded - {None}:
            raise errors.KeyRequired(path=str(folder), reason="the chain is encrypted but its key slot file is "
                                                              "missing")
        return None
    if recorded != {key.fingerprint}:
        raise errors.WrongKey(path=str(folder), reason=f"the chain's points were written with key "
                                                       f"{', '.join(sorted(str(r) for r in recorded))}, this key "
                                                       f"is {key.fingerprint}: an {level} must use the chain's key")
    return BackupCrypt(key, None)


def seal_side(crypt: BackupCrypt | None, name: str, data: bytes) -> bytes:
    return data if crypt is None else crypt.key.seal(name, data)


def point_extra(crypt: BackupCrypt | None, extra: dict[str, Any]) -> dict[str, Any]:
    """``guest_info`` sealed (it names the guest's OS, host name, file systems); the key record added."""
    if crypt is None:
        return extra
    out = dict(extra)
    info = out.pop("guest_info", None)
    if info:
        import json
        out["guest_info_sealed"] = crypt.key.seal_text("guest_info", json.dumps(info, sort_keys=True).encode())
    out[POINT_KEY] = crypt.record()
    return out


def save_new_ring(crypt: BackupCrypt | None, folder: Path) -> None:
    """With the first point: the key slot file of a new encrypted chain (or no stale one for a plain chain)."""
    if crypt is not None and crypt.new_ring is not None:
        store.save_ring(folder, crypt.new_ring)
    elif crypt is None:
        with contextlib.suppress(FileNotFoundError):
            if bsmanifest.load(folder) is None:
                store.keys_path(folder).unlink()
                log.info("removed the key slot file of an earlier failed encrypted full backup")


def mac_key(crypt: BackupCrypt | None) -> bytes | None:
    return crypt.key.manifest_key() if crypt is not None else None
