"""virtnbdrestore: argv -> frozen RestoreOptions -> restore engine."""
from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

from virtnbd import __version__, errors
from virtnbd.cli import keyargs, rbdargs
from virtnbd.cli.shell import OneLineParser, run_main
from virtnbd.restore.options import ACTIONS, FORMATS, RestoreOptions

PROG = "virtnbdrestore"


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog=PROG,
        description="Restore, dump or verify a virtnbd (or virtnbdbackup) backup set.",
        epilog="Exit codes: 0 ok, 1 error, 2 warnings with --strict, 128+N on signal N.",
    )
    p.add_argument("-i", "--input", required=True, metavar="DIR", help="backup set folder")
    p.add_argument("-o", "--output", metavar="OUT", help="output folder for restored images (restore)")
    p.add_argument("-a", "--action", choices=ACTIONS, default="restore",
                   help="restore (default), dump the metadata of every point, or verify every file")
    p.add_argument("--until", metavar="POINT", help="restore this point (e.g. virtnbdbackup.3); default: newest")
    p.add_argument("-d", "--disk", metavar="DEV", help="only this disk (target dev, e.g. sda)")
    p.add_argument("--sequence", metavar="F1,F2,...",
                   help="explicit comma-separated list of stream files, full first (checked for chain consistency)")
    p.add_argument("--format", choices=FORMATS, default="qcow2", help="output image format (default qcow2)")
    p.add_argument("--preallocate", action="store_true", help="allocate the whole output image")
    p.add_argument("-c", "--adjust-config", action="store_true",
                   help="write a domain XML that boots the restored disks (new name, no UUID, new MACs)")
    p.add_argument("-N", "--name", metavar="NAME", help="name of the adjusted domain (default restore_<name>)")
    p.add_argument("-D", "--define", action="store_true", help="define the adjusted domain in libvirt (implies -c)")
    p.add_argument("-U", "--uri", default="qemu:///system", metavar="URI",
                   help="libvirt connection URI for --define (default qemu:///system)")
    p.add_argument("--json", action="store_true", help="dump: print JSON instead of a table")
    p.add_argument("-n", "--noprogress", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="debug output")
    p.add_argument("--strict", action="store_true", help="exit 2 when warnings were logged")
    p.add_argument("-w", "--worker", type=int, default=4, metavar="N",
                   help="requests in flight / files verified at once (default 4)")
    p.add_argument("-V", "--version", action="version", version=f"%(prog)s {__version__}")
    rbdargs.add_arguments(p)
    keyargs.add_arguments(p)
    return p


def parse(argv: Sequence[str]) -> RestoreOptions:
    args = build_parser().parse_args(list(argv))
    if args.worker < 1:
        raise errors.UsageError(reason="--worker must be at least 1")
    sequence: tuple[str, ...] = ()
    if args.sequence:
        names = [s.strip() for s in args.sequence.split(",") if s.strip()]
        sequence = tuple(n if os.path.isabs(n) or os.path.exists(n) else os.path.join(args.input, n) for n in names)
        if args.until:
            raise errors.UsageError(reason="--until and --sequence exclude each other (the sequence ends the chain)")
    targets = rbdargs.parse_targets(args.target)
    if args.action == "restore" and not args.output and not targets:
        raise errors.UsageError(reason="restore needs an output folder: -o OUT")
    if args.json and args.action != "dump":
        raise errors.UsageError(reason="--json goes with -a dump")
    if (args.name or args.define) and args.action != "restore":
        raise errors.UsageError(reason="-N/--name and -D/--define go with -a restore")
    return RestoreOptions(
        input=args.input, output=args.output, action=args.action, until=args.until, disk=args.disk,
        sequence=sequence, format=args.format, preallocate=args.preallocate,
        adjust_config=args.adjust_config or args.define or bool(args.name), name=args.name, define=args.define,
        uri=args.uri, json=args.json, noprogress=args.noprogress, verbose=args.verbose, strict=args.strict,
        worker=args.worker, targets=targets, rbd=rbdargs.rbd_options(args), key=keyargs.key_spec(args),
    )


def _run(options: RestoreOptions) -> None:
    from virtnbd.restore.run import run
    run(options)


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(PROG, argv, parse, _run)
