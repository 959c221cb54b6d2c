"""The restore side of encryption: which secret opens the set, and checks before any output.

Restore and dump need the key of an encrypted set: the set (backupset/encrypted.py)
authenticates its manifest, every sealed side file is authenticated before
anything is written, and every data frame as it is read. Verify without the
key still checks every file's structure, the checksums that cover the
ciphertext, chained digests and the manifest records, and then says that it
could not authenticate the contents.
"""
from __future__ import annotations

import os

from virtnbd import errors
from virtnbd.backupset import encrypted
from virtnbd.backupset.api import open_set
from virtnbd.restore.options import RestoreOptions

UNAUTHENTICATED = ("encrypted set verified without its key: structure, ciphertext checksums, chained digests and "
                   "manifest records are intact, but the contents could NOT be authenticated (give --key-file or "
                   "--passphrase-file to authenticate them)")


def prepare(options: RestoreOptions) -> tuple[bool, bool]:
    """(encrypted, keyless) for the set the options name; the secret is installed for every open_set."""
    encrypted.install()
    keyless_ok = options.action == "verify"
    encrypted.use_keys(options.key, keyless_ok=keyless_ok)
    folder = options.input
    if options.sequence:
        folder = os.path.dirname(os.path.abspath(options.sequence[0]))
    if not encrypted.holds_keys(folder):
        encrypted.plain_key_given(folder, options.key)
        return False, False
    if options.sequence:
        raise errors.UsageError(reason="--sequence does not open encrypted sets: use -i DIR with --until")
    keyless = keyless_ok and not options.key.given
    if not keyless:
        encrypted.authenticate(open_set(folder))
    return True, keyless
