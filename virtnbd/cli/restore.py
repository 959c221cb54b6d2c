"""virtnbdrestore: argv -> frozen RestoreOptions -> restore engine."""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from virtnbd import __version__, errors
from virtnbd.cli import hostargs, keyargs, locations, parity, rbdargs, s3args
from virtnbd.cli.shell import OneLineParser, run_main
from virtnbd.remote.options import DEFAULT_TLS_DIR
from virtnbd.restore.options import ACTIONS, FORMATS, RemoteOptions, RestoreOptions
from virtnbd.restore.targets import blockdev

PROG = "virtnbdrestore"


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog=PROG,
        description="Restore, dump or verify a virtnbd (or virtnbdbackup) backup set.",
        epilog="Exit codes: 0 ok, 1 error, 2 warnings with --strict, 128+N on signal N.",
    )
    p.add_argument("-i", "--input", required=True, metavar="DIR", help="backup set folder, or s3://BUCKET/PREFIX")
    p.add_argument("-o", "--output", metavar="OUT",
                   help="output folder for restored images (restore); -o dump and -o verify mean -a dump / "
                        "-a verify (a folder of that name: -o ./verify)")
    p.add_argument("-a", "--action", choices=ACTIONS, default="restore",
                   help="restore (default), dump the metadata of every point, verify every file, instant (run the "
                        "domain on the backup at once, copy its disks while it runs) or drill (boot the point in "
                        "an isolated throw-away domain and report pass/fail)")
    p.add_argument("-u", "--until", metavar="POINT", help="restore this point (e.g. virtnbdbackup.3); default: newest")
    p.add_argument("-d", "--disk", metavar="DEV", help="only this disk (target dev, e.g. sda)")
    p.add_argument("-s", "--sequence", metavar="F1,F2,...",
                   help="explicit comma-separated list of stream files, full first (checked for chain consistency)")
    p.add_argument("--format", choices=FORMATS, default=None, help="output image format (default qcow2)")
    p.add_argument("-A", "--preallocate", action="store_true", help="allocate the whole output image")
    p.add_argument("-c", "--adjust-config", action="store_true",
                   help="write a domain XML that boots the restored disks (new name, no UUID, new MACs)")
    p.add_argument("-N", "--name", metavar="NAME", help="name of the adjusted domain (default restore_<name>)")
    p.add_argument("-D", "--define", action="store_true", help="define the adjusted domain in libvirt (implies -c)")
    p.add_argument("-U", "--uri", default="qemu:///system", metavar="URI",
                   help="libvirt connection URI for --define (default qemu:///system); another host "
                        "(qemu+ssh://USER@HOST/system): the images are restored onto it, -o is a folder there")
    p.add_argument("--json", action="store_true", help="dump, drill: print JSON instead of a table / a line")
    p.add_argument("-n", "--noprogress", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="debug output")
    p.add_argument("-e", "--strict", action="store_true", help="exit 2 when warnings were logged")
    p.add_argument("-L", "--logfile", metavar="FILE", help="also write a debug log to FILE (created 0600)")
    p.add_argument("-w", "--worker", type=int, default=4, metavar="N",
                   help="requests in flight / files verified at once (default 4)")
    p.add_argument("-V", "--version", action="version", version=f"%(prog)s {__version__}")
    hostargs.add_restore_host(p)
    _live_arguments(p)
    rbdargs.add_arguments(p)
    s3args.add_arguments(p)
    keyargs.add_arguments(p)
    parity.add_arguments(p, parity.RESTORE)
    return p


def _live_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("instant restore and restore drill (-a instant, -a drill)")
    g.add_argument("--bandwidth", type=int, metavar="MIB",
                   help="instant: limit the background copy to MIB MiB/s (default: as fast as it goes)")
    g.add_argument("--paused", action="store_true",
                   help="instant: start the domain paused (virsh resume runs it; the copy goes on meanwhile)")
    g.add_argument("--no-migrate", action="store_true",
                   help="instant: run the domain on the backup only (transient, writes discarded), no copy, "
                        "until it stops or Ctrl-C/SIGTERM")
    g.add_argument("--check", metavar="CMD",
                   help="drill: shell command the guest agent runs in the guest; the drill passes when it exits 0")
    g.add_argument("--boot-timeout", type=float, default=300.0, metavar="SECONDS",
                   help="drill: wait this long for the guest agent, and again for --check (default 300)")


def _check_live(args: argparse.Namespace) -> None:
    """-a instant / -a drill: a local set; instant needs an output folder for the final images."""
    live = args.action in ("instant", "drill")
    if not live:
        if args.bandwidth is not None or args.paused or args.no_migrate or args.check is not None:
            raise errors.UsageError(reason="--bandwidth/--paused/--no-migrate go with -a instant, --check with "
                                           "-a drill")
        return
    if args.input == "-" or "://" in args.input or args.sequence or args.target:
        raise errors.UsageError(reason=f"-a {args.action} boots a local backup set folder (no -i -, s3://, "
                                       "-s or --target)")
    if args.action == "instant" and not args.no_migrate and (not args.output or args.output == "-" or
                                                             blockdev.is_block_device(args.output)):
        raise errors.UsageError(reason="-a instant needs an output folder for the final images: -o OUT")
    if args.no_migrate and args.bandwidth is not None:
        raise errors.UsageError(reason="--no-migrate copies nothing: no --bandwidth")
    if args.bandwidth is not None and args.bandwidth < 1:
        raise errors.UsageError(reason="--bandwidth must be at least 1 (MiB/s)")
    if args.boot_timeout <= 0:
        raise errors.UsageError(reason="--boot-timeout must be positive")
    if args.action == "drill" and (args.bandwidth is not None or args.paused or args.no_migrate):
        raise errors.UsageError(reason="--bandwidth, --paused and --no-migrate go with -a instant")


def _check_stdout(args: argparse.Namespace) -> None:
    """``-o -``: one disk as a raw image on stdout."""
    if args.action != "restore" or args.format not in (None, "raw") or args.adjust_config or args.define:
        raise errors.UsageError(reason="-o - writes one disk as a raw image to standard output "
                                       "(no --format qcow2, -c, -D)")
    if sys.stdout.isatty():
        raise errors.UsageError(reason="-o -: standard output is a terminal; pipe it into a file or device")
    args.format = "raw"


def _shortcuts(args: argparse.Namespace) -> None:
    """virtnbdbackup's ``-o dump`` / ``-o verify``; every location checked for its scheme."""
    if args.output in ("dump", "verify"):
        if args.action not in ("restore", args.output):
            raise errors.UsageError(reason=f"-o {args.output} means -a {args.output}, not -a {args.action}")
        args.action, args.output = args.output, None
    if args.output == "-":
        _check_stdout(args)
    if args.input == "-" and args.sequence:
        raise errors.UsageError(reason="-i - and -s/--sequence exclude each other")
    locations.check(args.input, "restore-input", "-i/--input")
    if args.output:
        locations.check(args.output, "restore-output", "-o/--output")
    for line in args.ignored:
        print(f"{PROG}: note: {line}", file=sys.stderr)


def _to_device(args: argparse.Namespace, targets: tuple[tuple[str, str], ...]) -> tuple[
        tuple[tuple[str, str], ...], None, str]:
    """``-o /dev/...``: one disk, raw, straight onto the device."""
    if targets:
        raise errors.UsageError(reason="-o DEVICE and --target exclude each other")
    if args.adjust_config or args.define or args.name:
        raise errors.UsageError(reason="-o DEVICE: -c/-D/-N need an output folder for the domain XML")
    if args.format not in (None, "raw"):
        raise errors.UsageError(reason=f"-o DEVICE writes a raw disk, not --format {args.format}")
    why = blockdev.in_use(args.output)
    if why:                                  # checked again when the device is opened (O_EXCL)
        raise errors.StorageError(path=args.output, reason=f"in use ({why}), refusing to overwrite it")
    from virtnbd.restore import targets as store
    store.register(blockdev.SCHEME, blockdev.open_blockdev)
    return ((args.disk or "", f"{blockdev.SCHEME}:{args.output}"),), None, "raw"


def parse(argv: Sequence[str]) -> RestoreOptions:
    args = build_parser().parse_args(list(argv))
    _shortcuts(args)
    _check_live(args)
    s3args.apply(s3args.s3_options(args))
    if args.worker < 1:
        raise errors.UsageError(reason="--worker must be at least 1")
    sequence: tuple[str, ...] = ()
    if args.sequence:
        names = [s.strip() for s in args.sequence.split(",") if s.strip()]
        sequence = tuple(n if os.path.isabs(n) or os.path.exists(n) else os.path.join(args.input, n) for n in names)
        if args.until:
            raise errors.UsageError(reason="--until and --sequence exclude each other (the sequence ends the chain)")
    targets = rbdargs.parse_targets(args.target)
    if args.output and args.action == "restore" and blockdev.is_block_device(args.output):
        targets, args.output, args.format = _to_device(args, targets)
    if args.action == "restore" and not args.output and not targets:
        raise errors.UsageError(reason="restore needs an output folder: -o OUT")
    if args.json and args.action not in ("dump", "drill"):
        raise errors.UsageError(reason="--json goes with -a dump and -a drill")
    if args.define and args.action != "restore" or args.name and args.action not in ("restore", "instant", "drill"):
        raise errors.UsageError(reason="-D/--define goes with -a restore, -N/--name with -a restore|instant|drill")
    return RestoreOptions(
        input=args.input, output=args.output, action=args.action, until=args.until, disk=args.disk,
        sequence=sequence, format=args.format or "qcow2", preallocate=args.preallocate,
        adjust_config=args.adjust_config or args.define or bool(args.name), name=args.name, define=args.define,
        uri=args.uri, json=args.json, noprogress=args.noprogress, verbose=args.verbose, strict=args.strict,
        worker=args.worker, targets=targets, rbd=rbdargs.rbd_options(args), key=keyargs.key_spec(args),
        logfile=args.logfile, password_file=args.password_file, remote=_remote(args),
        bandwidth=args.bandwidth, paused=args.paused, no_migrate=args.no_migrate,
        check=args.check,
        boot_timeout=args.boot_timeout,
    )


def _remote(args: argparse.Namespace) -> RemoteOptions | None:
    hostargs.checked_uri(args.uri, args.password_file)
    remote = hostargs.remote_options(args)
    if remote is not None and args.action in ("instant", "drill"):
        raise errors.UsageError(reason=f"-a {args.action} runs the domain on this host: -U must be local")
    if remote is not None and (args.output == "-" or not args.output and not args.target):
        raise errors.UsageError(reason="a remote restore (-U on another host) needs -o FOLDER on that host "
                                       "(or -o rbd:POOL)")
    files = bool(args.output) and not str(args.output).startswith("rbd:")
    if remote is not None and remote.tls and not remote.tls_cert and files:     # the same default as a backup
        remote = dataclasses.replace(remote, tls_cert=DEFAULT_TLS_DIR)
    return remote


def _run(options: RestoreOptions) -> None:
    from virtnbd.ops import stdio
    if options.input != "-":
        _restore(options)
        return
    with stdio.scratch_set(_scratch()) as scratch:   # -i -: a container on stdin
        _restore(dataclasses.replace(options, input=str(stdio.read_container(scratch))))


def _scratch() -> str:
    return os.environ.get("TMPDIR", "/var/tmp")


def _restore(options: RestoreOptions) -> None:
    """-o -: restored as raw into a private folder, then sent to stdout (one disk)."""
    from virtnbd.ops import stdio
    from virtnbd.restore import run
    if options.output != "-":
        run.run(options)
        return
    with stdio.scratch_set(_scratch()) as scratch:
        selection = run.make_selection(options)
        if len(selection.disks) != 1:
            raise errors.UsageError(reason=f"-o - takes one disk; the set has {len(selection.disks)}: "
                                           "choose one with -d")
        done = run.restore(selection, dataclasses.replace(options, output=str(scratch)))
        stdio.send_file(Path(done[0].target))


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(PROG, argv, parse, _run)
