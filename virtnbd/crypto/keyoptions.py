"""``virtnbdkey``'s options, without the cipher libraries (``--help`` and argv parsing build them;
virtnbd.crypto.admin carries them out)."""
from __future__ import annotations

from dataclasses import dataclass

from virtnbd.crypto.keysource import KeySpec

ACTIONS = ("create-keyfile", "list", "add", "remove", "passwd")


@dataclass(frozen=True)
class KeyOptions:
    action: str
    input: str | None = None            # backup set folder
    path: str | None = None             # create-keyfile: the new key file
    key: KeySpec = KeySpec()            # a secret that opens the set now
    new_key: KeySpec = KeySpec()        # add/passwd: the new secret
    slot: str | None = None             # remove: slot id
    verbose: bool = False
