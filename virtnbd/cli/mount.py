"""virtnbdmount: argv -> frozen MountOptions -> every point and disk of a set as read-only files (FUSE)."""
from __future__ import annotations

import argparse
from collections.abc import Sequence

from virtnbd import __version__
from virtnbd.access.options import MountOptions
from virtnbd.cli import keyargs
from virtnbd.cli.shell import OneLineParser, run_main

PROG = "virtnbdmount"


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog=PROG,
        description="Mount a backup set read-only: MOUNTPOINT/<point>/<disk>.raw for every point and disk "
                    "(FUSE, no nbd kernel module). Runs until unmounted (umount MOUNTPOINT), SIGINT or SIGTERM.",
        epilog="Exit codes: 0 unmounted, 1 error, 128+N stopped by signal N (unmounted cleanly).",
    )
    p.add_argument("input", metavar="SET", help="backup set folder")
    p.add_argument("mountpoint", metavar="MOUNTPOINT", help="an existing empty directory")
    keyargs.add_arguments(p)
    p.add_argument("-v", "--verbose", action="store_true", help="debug output")
    p.add_argument("--strict", action="store_true", help="exit 2 when warnings were logged")
    p.add_argument("-V", "--version", action="version", version=f"%(prog)s {__version__}")
    return p


def parse(argv: Sequence[str]) -> MountOptions:
    args = build_parser().parse_args(list(argv))
    return MountOptions(input=args.input, mountpoint=args.mountpoint, key=keyargs.key_spec(args),
                        verbose=args.verbose, strict=args.strict)


def _run(options: MountOptions) -> None:
    from virtnbd.access.fusefs import run
    run(options)


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(PROG, argv, parse, _run)
