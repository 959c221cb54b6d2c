"""``virtnbdbackup``: argv -> frozen BackupOptions -> virtnbd.backup.run."""
from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence

from virtnbd import __version__, errors
from virtnbd.backup import renew
from virtnbd.backup.options import COMPRESS_METHODS, LEVELS, BackupOptions
from virtnbd.backup.renew import Renew
from virtnbd.cli import keyargs, locations, parity, prune, rbdargs, remoteargs, s3args
from virtnbd.cli.shell import OneLineParser, run_main
from virtnbd.ops.options import FleetOptions
from virtnbd.retention.policy import Policy
from virtnbd.stream import compression

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


TYPE_HELP = ("kind of backup set: stream (checked, indexed streams; default) or qcow2 (one qcow2 image per "
             "disk and point, overlays chained by relative backing names); raw is refused")


def build_parser() -> OneLineParser:
    p = OneLineParser(prog=PROG, description="Online, thin, incremental backup of libvirt/KVM domains over NBD.")
    p.add_argument("-d", "--domain", default=None,
                   help="domain name (or UUID) to back up; several: -d a,b,c (each into OUTPUT/<domain>/)")
    _add_fleet_arguments(p)
    p.add_argument("-k", "--killonly", action="store_true",
                   help="only abort a backup job left on the domain by a killed run, then exit")
    _add_type_arguments(p)
    p.add_argument("-L", "--syslog", action="store_true", help="also send the messages to syslog")
    p.add_argument("-l", "--level", choices=LEVELS, default="copy",
                   help="copy (no checkpoint), full (new chain), inc, diff, auto (full into an empty "
                        "folder, inc otherwise); default: copy")
    p.add_argument("-o", "--output", required=True,
                   help="backup folder (one folder per chain); several domains: the folder holding one per domain")
    p.add_argument("-U", "--uri", default=None, help="libvirt connection URI (default: qemu:///system)")
    p.add_argument("-i", "--include", action="append", type=_list, default=[],
                   help="back up only these disks (target dev names, comma separated or repeated: -i sda,vdb)")
    p.add_argument("-x", "--exclude", action="append", type=_list, default=[],
                   help="leave these disks out (comma separated or repeated: -x sdb)")
    p.add_argument("-z", "--compress", nargs="?", type=int, const=-1, default=None, metavar="LEVEL",
                   help="compress data frames, optionally with this level")
    p.add_argument("--compress-method", choices=COMPRESS_METHODS, default="lz4",
                   help="compression method for -z (default: lz4)")
    p.add_argument("-w", "--worker", type=int, default=None,
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
    p.add_argument("--quiet", action="store_true", help="only errors on stderr")
    p.add_argument("-v", "--verbose", action="store_true", help="debug output")
    p.add_argument("-e", "--strict", action="store_true", help="exit with code 2 when warnings were logged")
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
    _add_retention_arguments(p)
    p.add_argument("-V", "--version", action="version", version=f"%(prog)s {__version__}")
    _add_groups(p)
    return p


def _add_groups(p: OneLineParser) -> None:
    """Option groups of their own modules: keys, remote hosts, Ceph, abbbi parity."""
    _add_key_and_store_arguments(p)
    remoteargs.add_arguments(p)
    rbdargs.add_ceph_arguments(p.add_argument_group("Ceph (raw RBD disks: incrementals from RBD snapshots + diff)"))
    parity.add_arguments(p, parity.BACKUP)


def _add_type_arguments(p: argparse.ArgumentParser) -> None:
    """-t/--type and --push (who writes a qcow2 set's images)."""
    p.add_argument("-t", "--type", choices=("stream", "raw", "qcow2"), default="stream",
                   help=TYPE_HELP)
    p.add_argument("--push", action="store_true",
                   help="with -t qcow2: a libvirt push-mode backup job (QEMU) writes each disk's point image "
                        "instead of virtnbd's own NBD reader (needs a running domain; slower here, see README)")


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


_TYPES = {
    "raw": "-t raw: virtnbd always writes checked, indexed streams; get raw images from any point with "
           "virtnbdrestore --format raw",
}


def _check_stdout(args: argparse.Namespace) -> None:
    """``-o -``: one domain, a new set (copy/full), nothing else on stdout."""
    if args.level not in ("copy", "full"):
        raise errors.UsageError(reason=f"-o -: a stream holds one new set: -l copy or -l full, not -l {args.level}")
    if args.json or args.all_domains or (args.domain and "," in args.domain):
        raise errors.UsageError(reason="-o - goes with one domain and without --json (stdout carries the backup)")
    if sys.stdout.isatty():
        raise errors.UsageError(reason="-o -: standard output is a terminal; pipe it into a file or "
                                       "virtnbdrestore -i -")


def _check_qcow2(args: argparse.Namespace) -> None:
    """-t qcow2: the images are plain qcow2 in a local folder (no stream compression, no encryption
    stage, no pipe, no object store)."""
    if args.compress is not None:
        raise errors.UsageError(reason="-t qcow2 writes plain qcow2 images: -z/--compress goes with -t stream")
    if keyargs.key_spec(args).given:
        raise errors.UsageError(reason="-t qcow2 sets are not encrypted: key options go with -t stream")
    if args.output == "-":
        raise errors.UsageError(reason="-o -: a stream set only (-t stream)")
    found = locations.scheme(args.output)
    if found is not None:
        raise errors.UsageError(reason=f"-t qcow2 sets are written into a local folder: {found}:// goes with "
                                       "-t stream")


def _check_values(args: argparse.Namespace) -> None:
    """Every value checked before anything connects to libvirt."""
    if args.push and args.type != "qcow2":
        raise errors.UsageError(reason="--push writes qcow2 sets: use -t qcow2 --push")
    if args.type in _TYPES:
        raise errors.UsageError(reason=_TYPES[args.type])
    if args.type == "qcow2":
        _check_qcow2(args)
    if args.worker is not None and args.worker < 1:
        raise errors.UsageError(reason="-w/--worker must be 1 or more (leave it out for one per disk, at most 4)")
    if args.parallel < 1:
        raise errors.UsageError(reason="--parallel must be 1 or more")
    if args.output == "-":
        _check_stdout(args)
    locations.check(args.output, "backup-output", "-o/--output")
    if args.compress is not None:
        compression.check_method(args.compress_method, None if args.compress == -1 else args.compress)
    if not (args.domain or args.all_domains):
        raise errors.UsageError(reason="the following arguments are required: -d/--domain (or --all)")
    if args.domain and args.all_domains:
        raise errors.UsageError(reason="-d/--domain and --all exclude each other")
    if (args.exclude_domain or args.match) and not args.all_domains:
        raise errors.UsageError(reason="--exclude-domain and --match go with --all")


def parse(argv: Sequence[str]) -> BackupOptions:
    """argv -> the per-domain options (the domain is empty when the run has several)."""
    return parse_run(argv).backup


def parse_run(argv: Sequence[str]) -> FleetOptions:
    """argv -> the run: one domain (OUTPUT is its folder) or several (OUTPUT/<domain>/ each)."""
    args = build_parser().parse_args(argv)
    _check_values(args)
    for line in args.ignored:
        if not args.quiet:
            print(f"{PROG}: note: {line}", file=sys.stderr)
    domains = tuple(_list(args.domain)) if args.domain else ()
    backup = _backup_options(args, domains[0] if len(domains) == 1 else "")
    return FleetOptions(
        backup=backup, domains=domains, all_domains=args.all_domains,
        exclude_domains=_flat(args.exclude_domain), match=_flat(args.match), parallel=args.parallel,
        hook=args.hook, metrics_file=args.metrics_file, killonly=args.killonly,
        quiet=args.quiet, syslog=args.syslog,
    )


def _backup_options(args: argparse.Namespace, domain: str) -> BackupOptions:
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
        domain=domain, level=args.level, output=args.output, uri=args.uri,
        include=_flat(args.include), exclude=_flat(args.exclude),
        compress=args.compress is not None, compress_level=level, compress_method=args.compress_method,
        workers=args.worker or 0, scratchdir=args.scratchdir, socketfile=args.socketfile,
        printonly=args.printonly, threshold=args.threshold, noprogress=args.noprogress,
        verbose=args.verbose, strict=args.strict, json=args.json,
        freeze=not args.no_freeze, freeze_mountpoints=_flat(args.freeze_mountpoint), no_freeze=args.no_freeze,
        pause=args.pause, agent_timeout=args.agent_timeout, read_size=args.read_size,
        fallback_full=args.fallback_full, umask=args.umask, push=args.push,
        ceph=rbdargs.ceph_options(args), keep=_keep(args), merge=args.merge, renew=args.renew,
        key=keyargs.key_spec(args), set_kind=args.type, remote=remoteargs.remote_options(args),
        s3=s3args.s3_options(args),
    )


def _add_key_and_store_arguments(p: argparse.ArgumentParser) -> None:
    keyargs.add_arguments(p)
    s3args.add_arguments(p)


def _add_fleet_arguments(p: argparse.ArgumentParser) -> None:
    """Several domains per run: selection, parallelism, hooks, metrics."""
    p.add_argument("--all", action="store_true", dest="all_domains",
                   help="back up every domain of the connection that has disks to back up (each into OUTPUT/<domain>/)")
    p.add_argument("--exclude-domain", action="append", type=_list, default=[], metavar="NAMES",
                   help="with --all: leave out these domains (shell patterns, comma separated or repeated)")
    p.add_argument("--match", action="append", type=_list, default=[], metavar="PATTERNS",
                   help="with --all: only domains whose name matches one of these shell patterns")
    p.add_argument("--parallel", type=int, default=1, metavar="N",
                   help="several domains: back up at most N at once (default 1)")
    p.add_argument("--hook", default=None, metavar="CMD",
                   help="run CMD at start and end of each domain, on failure and at the end (VIRTNBD_* environment)")
    p.add_argument("--metrics-file", default=None, metavar="PATH",
                   help="write Prometheus text-format metrics to PATH (atomically), for node_exporter")


def _add_retention_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--renew", type=_renew, default=None, metavar="N|DURATION",
                   help="-l auto: start a new chain (the old one moves to OUTPUT/chain-<time>/) after N incs "
                        "or once the full is DURATION old (e.g. 30, 1m, 7d)")
    prune.add_policy_arguments(p.add_argument_group(
        "Retention (applied after a committed backup, to every chain of OUTPUT; see virtnbdprune)"))


def _renew(text: str) -> Renew:
    try:
        return renew.parse(text)
    except errors.UsageError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _keep(args: argparse.Namespace) -> Policy | None:
    if args.renew is not None and args.level != "auto":
        raise errors.UsageError(reason="--renew goes with -l auto")
    policy = prune.policy_of(args)
    if policy.empty and args.merge:
        raise errors.UsageError(reason="--merge goes with --keep-* rules")
    return None if policy.empty else policy


def _run(options: FleetOptions) -> None:
    from virtnbd.ops import fleet
    fleet.run(options)


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(PROG, argv, parse_run, _run)


if __name__ == "__main__":
    sys.exit(main())
