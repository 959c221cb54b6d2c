"""``virtnbdbackup``: argv -> frozen BackupOptions -> virtnbd.backup.run."""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence

from virtnbd import __version__, errors
from virtnbd.backup.options import COMPRESS_METHODS, LEVELS, BackupOptions
from virtnbd.cli import keyargs, rbdargs
from virtnbd.cli.shell import OneLineParser, run_main

PROG = "virtnbdbackup"
_SIZE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``1048576``, ``512K``, ``64M``, ``2G`` (binary units)."""
    match = _SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 4096, 512K, 64M, 1G)")
    return int(match.group(1)) << (10 * " kmgt".index(match.group(2).lower() or " "))


def _list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def build_parser() -> OneLineParser:
    p = OneLineParser(prog=PROG, description="Online, thin, incremental backup of libvirt/KVM domains over NBD.")
    p.add_argument("-d", "--domain", required=True, help="domain name (or UUID) to back up")
    p.add_argument("-l", "--level", choices=LEVELS, default="copy",
                   help="copy (no checkpoint), full (new chain), inc, diff, auto (full into an empty "
                        "folder, inc otherwise); default: copy")
    p.add_argument("-o", "--output", required=True, help="backup folder (one folder per chain)")
    p.add_argument("-U", "--uri", default=None, help="libvirt connection URI (default: qemu:///system)")
    p.add_argument("-i", "--include", action="append", type=_list, default=[],
                   help="back up only these disks (target dev names, comma separated or repeated: -i sda,vdb)")
    p.add_argument("-x", "--exclude", action="append", type=_list, default=[],
                   help="leave these disks out (comma separated or repeated: -x sdb)")
    p.add_argument("-z", "--compress", nargs="?", type=int, const=-1, default=None, metavar="LEVEL",
                   help="compress data frames, optionally with this level")
    p.add_argument("--compress-method", choices=COMPRESS_METHODS, default="lz4",
                   help="compression method for -z (default: lz4)")
    p.add_argument("-w", "--worker", type=int, default=0,
                   help="disks backed up in parallel (default: one per disk, at most 4)")
    p.add_argument("--scratchdir", default="/var/tmp",
                   help="folder for the job's scratch files and socket (default: /var/tmp)")
    p.add_argument("-f", "--socketfile", default=None,
                   help="unix socket of the NBD export (default: private folder under --scratchdir)")
    p.add_argument("-p", "--printonly", action="store_true",
                   help="only estimate the size of the backup (inc/diff: from the checkpoint), copy nothing")
    p.add_argument("-T", "--threshold", type=parse_size, default=None, metavar="SIZE",
                   help="inc/diff: skip the backup when fewer bytes changed (e.g. 64M)")
    p.add_argument("-n", "--noprogress", action="store_true", help="no progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="debug output")
    p.add_argument("--strict", action="store_true", help="exit with code 2 when warnings were logged")
    p.add_argument("--json", action="store_true", help="print a machine-readable summary on stdout")
    p.add_argument("-F", "--freeze-mountpoint", action="append", type=_list, default=[], metavar="MOUNTPOINTS",
                   help="freeze only these guest mountpoints (comma separated)")
    p.add_argument("--no-freeze", action="store_true", help="do not freeze guest filesystems")
    p.add_argument("--pause", action="store_true",
                   help="pause the domain around the start of the job instead of freezing (no agent needed)")
    p.add_argument("--agent-timeout", type=int, default=10, metavar="SECONDS",
                   help="seconds to wait for the guest agent (default: 10)")
    p.add_argument("--fallback-full", action="store_true",
                   help="inc/diff: when the chain cannot be continued (lost or broken bitmaps), move it to "
                        "OUTPUT/chain-<time>/ and start a new chain with a full backup (-l auto does this too)")
    p.add_argument("--umask", type=_umask, default=None, metavar="OCTAL",
                   help="umask for backup files and folders (default 077: files 0600, folders 0700)")
    p.add_argument("--read-size", type=parse_size, default=256 << 10, metavar="SIZE",
                   help="bytes per NBD read request (default: 256K; data frames stay 1M, read in several "
                        "requests, or SIZE when larger)")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    keyargs.add_arguments(p)
    rbdargs.add_ceph_arguments(p.add_argument_group("Ceph (raw RBD disks: incrementals from RBD snapshots + diff)"))
    return p


def _umask(text: str) -> int:
    try:
        value = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an octal umask: {text!r} (examples: 077, 027, 022)") from None
    if not 0 <= value <= 0o777:
        raise argparse.ArgumentTypeError(f"umask out of range: {text!r} (000-777)")
    return value


def _flat(lists: Sequence[Sequence[str]]) -> tuple[str, ...]:
    return tuple(item for sub in lists for item in sub)


def parse(argv: Sequence[str]) -> BackupOptions:
    args = build_parser().parse_args(argv)
    if args.worker < 0:
        raise errors.UsageError(reason="-w/--worker must be 0 or more")
    if args.agent_timeout <= 0:
        raise errors.UsageError(reason="--agent-timeout must be positive")
    if not 4096 <= args.read_size <= 32 << 20:
        raise errors.UsageError(reason="--read-size must be between 4K and 32M")
    if args.no_freeze and args.freeze_mountpoint:
        raise errors.UsageError(reason="--no-freeze and -F/--freeze-mountpoint exclude each other")
    relative = [m for m in _flat(args.freeze_mountpoint) if not m.startswith("/")]
    if relative:
        raise errors.UsageError(reason=f"-F/--freeze-mountpoint takes absolute guest paths: {', '.join(relative)}")
    level = None if args.compress in (None, -1) else args.compress
    return BackupOptions(
        domain=args.domain, level=args.level, output=args.output, uri=args.uri,
        include=_flat(args.include), exclude=_flat(args.exclude),
        compress=args.compress is not None, compress_level=level, compress_method=args.compress_method,
        workers=args.worker, scratchdir=args.scratchdir, socketfile=args.socketfile,
        printonly=args.printonly, threshold=args.threshold, noprogress=args.noprogress,
        verbose=args.verbose, strict=args.strict, json=args.json,
        freeze=not args.no_freeze, freeze_mountpoints=_flat(args.freeze_mountpoint), no_freeze=args.no_freeze,
        pause=args.pause, agent_timeout=args.agent_timeout, read_size=args.read_size,
        fallback_full=args.fallback_full, umask=args.umask,
        ceph=rbdargs.ceph_options(args), key=keyargs.key_spec(args),
    )


def _run(options: BackupOptions) -> None:
    from virtnbd.backup import run
    summary = run.run(options)
    if options.json:
        json.dump(summary.as_json(), sys.stdout, indent=1, sort_keys=True)
        sys.stdout.write("\n")
        sys.stdout.flush()


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(PROG, argv, parse, _run)


if __name__ == "__main__":
    sys.exit(main())
