"""The key options every command that reads or changes a set shares (no secret on the command line)."""
from __future__ import annotations

import argparse
from typing import Any

from virtnbd.crypto import keysource
from virtnbd.crypto.keysource import KeySpec


def add_arguments(p: argparse.ArgumentParser | Any) -> None:
    group = p.add_argument_group("Encryption (the secret is read from a file or the environment, never from argv)")
    group.add_argument("--key-file", metavar="FILE", default=None,
                       help="file with the 32-byte key (mode 0600) that opens an encrypted set, or starts one "
                            "with a full backup; default: $VIRTNBD_KEY_FILE")
    group.add_argument("--passphrase-file", metavar="FILE", default=None,
                       help="file (mode 0600) whose first line is the passphrase; default: $VIRTNBD_PASSPHRASE")


def key_spec(args: argparse.Namespace) -> KeySpec:
    return keysource.spec_from(args.key_file, args.passphrase_file)
