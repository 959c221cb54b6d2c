"""The restore side of encryption: unlock the set, authenticate its manifest, key every chain file.

Restore and dump need the key of an encrypted set. Verify without it still
checks every file's structure, checksums (which cover the ciphertext), chained
digests and the manifest records, and says that it could not authenticate the
contents.
"""
from __future__ import annotations

import logging
import os
from dataclasses import replace

from virtnbd import errors
from virtnbd.backupset import manifest as bsmanifest
from virtnbd.crypto import store
from virtnbd.crypto.setkey import SetKey
from virtnbd.crypto.stage import SealStage
from virtnbd.restore import source
from virtnbd.restore.options import RestoreOptions
from virtnbd.restore.source import Selection

log = logging.getLogger(__name__)
UNAUTHENTICATED = ("encrypted set verified without its key: structure, ciphertext checksums, chained digests and "
                   "manifest records are intact, but the contents could NOT be authenticated (give --key-file or "
                   "--passphrase-file to authenticate them)")


def set_folder(options: RestoreOptions) -> str:
    return os.path.dirname(os.path.abspath(options.sequence[0])) if options.sequence else options.input


def unlock(options: RestoreOptions) -> tuple[SetKey | None, bool]:
    """(key, encrypted): the set's key; verify may go on without one (key None, encrypted True)."""
    folder = set_folder(options)
    if store.load_ring(folder) is None:
        store.open_key(folder, options.key)       # a key given for a plain set is an error
        return None, False
    if options.action == "verify" and not options.key.given:
        return None, True
    key = store.open_key(folder, options.key)
    if key is None:
        raise errors.KeyRequired(path=folder, reason="the backup set is encrypted")
    manifest = bsmanifest.load(folder)
    if manifest is not None:
        bsmanifest.authenticate(folder, key.manifest_key())
        check_side_files(folder, manifest, key)
    source.use_key(folder, key)
    return key, True


def side_names(point: bsmanifest.Point) -> list[str]:
    """The sealed side files a point lists (domain XML, checkpoint XML, qemu-img info, boot files)."""
    names = [n for n in (point.domain_xml, point.checkpoint_xml) if n and not n.lstrip().startswith("<")]
    for key in ("qemu_img_info", "boot_files"):
        names += [v for v in dict(point.extra.get(key) or {}).values() if isinstance(v, str)]
    return names


def check_side_files(folder: str, manifest: bsmanifest.Manifest, key: SetKey) -> None:
    """Every sealed side file and field authenticates (small: read whole, before any output)."""
    for point in manifest.points:
        for name in side_names(point):
            path = os.path.join(folder, name)
            try:
                with open(path, "rb") as f:
                    key.unseal(name, f.read(), path)
            except OSError as err:
                raise errors.FormatError(path=path, offset=0, reason=err.strerror or str(err)) from err
        sealed = point.extra.get("guest_info_sealed")
        if isinstance(sealed, str):
            key.unseal_text("guest_info", sealed, os.path.join(folder, bsmanifest.naming.MANIFEST))


def check_points(selection: Selection, key: SetKey | None) -> None:
    """Every point of an encrypted set records this key's fingerprint."""
    for point in selection.points:
        record = (point.extra or {}).get("encryption") or {}
        if key is not None and record.get("fingerprint") != key.fingerprint:
            raise errors.WrongKey(path=selection.folder, reason=f"point {point.name} was written with key "
                                                                f"{record.get('fingerprint')}, not {key.fingerprint}")


def keyed(selection: Selection, key: SetKey | None) -> Selection:
    """The selection with the AEAD stage on every chain file (keyless: checks only)."""
    stage = SealStage(key)
    disks = tuple(replace(chain, files=tuple(replace(cf, stages=(stage,)) for cf in chain.files))
                  for chain in selection.disks)
    check_points(selection, key)
    return replace(selection, disks=disks)
