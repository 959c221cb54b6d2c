"""``virtnbdkey``: argv -> frozen KeyOptions -> virtnbd.crypto.admin."""
from __future__ import annotations

import sys
from collections.abc import Sequence

from virtnbd import __version__, errors
from virtnbd.cli import keyargs
from virtnbd.cli.shell import OneLineParser, run_main
from virtnbd.crypto import keysource
from virtnbd.crypto.keyoptions import ACTIONS, KeyOptions

PROG = "virtnbdkey"


def build_parser() -> OneLineParser:
    p = OneLineParser(prog=PROG, description="Manage the keys of an encrypted virtnbd backup set: create a key "
                                             "file, list, add and remove key slots, change a passphrase. Data "
                                             "files are never rewritten.",
                      epilog="Exit codes: 0 ok, 1 error.")
    p.add_argument("action", choices=ACTIONS, help="create-keyfile FILE | list | add | remove --slot ID | passwd")
    p.add_argument("path", nargs="?", default=None, help="create-keyfile: the key file to create")
    p.add_argument("-i", "--input", metavar="DIR", help="backup set folder")
    p.add_argument("--slot", metavar="ID", help="remove: the key slot to remove (see list)")
    p.add_argument("--new-key-file", metavar="FILE", default=None,
                   help="add/passwd: the new key file; default: $VIRTNBD_NEW_KEY_FILE")
    p.add_argument("--new-passphrase-file", metavar="FILE", default=None,
                   help="add/passwd: file with the new passphrase; default: $VIRTNBD_NEW_PASSPHRASE")
    p.add_argument("-v", "--verbose", action="store_true", help="debug output")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    keyargs.add_arguments(p)
    return p


def parse(argv: Sequence[str]) -> KeyOptions:
    args = build_parser().parse_args(list(argv))
    if args.action == "create-keyfile":
        if not args.path:
            raise errors.UsageError(reason="create-keyfile needs the file to create: virtnbdkey create-keyfile FILE")
    elif not args.input:
        raise errors.UsageError(reason=f"{args.action} needs the backup set: -i DIR")
    if args.action == "remove" and not args.slot:
        raise errors.UsageError(reason="remove needs --slot ID (virtnbdkey list -i DIR shows them)")
    return KeyOptions(action=args.action, input=args.input, path=args.path, key=keyargs.key_spec(args),
                      new_key=keysource.spec_from(args.new_key_file, args.new_passphrase_file, new=True),
                      slot=args.slot, verbose=args.verbose)


def _run(options: KeyOptions) -> None:
    from virtnbd.crypto import admin
    for line in admin.run(options):
        print(line)


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(PROG, argv, parse, _run)


if __name__ == "__main__":
    sys.exit(main())
