"""virtnbdmap: argv -> frozen MapOptions -> serve one disk at one point over NBD."""
from __future__ import annotations

import argparse
from collections.abc import Sequence

from virtnbd import __version__, errors
from virtnbd.access.options import MapOptions
from virtnbd.cli import keyargs
from virtnbd.cli.shell import OneLineParser, run_main

PROG = "virtnbdmap"


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog=PROG,
        description="Serve one disk of a backup set at one point as an NBD export (read-only by default), "
                    "through nbdkit, without restoring it.",
        epilog="Exit codes: 0 ok (stopped by --timeout), 1 error, 128+N on signal N (the normal way to stop).",
    )
    p.add_argument("-i", "--input", required=True, metavar="DIR", help="backup set folder")
    p.add_argument("--until", metavar="POINT", help="serve this point (e.g. virtnbdbackup.3); default: newest")
    p.add_argument("-d", "--disk", metavar="DEV", help="serve this disk (needed when the point holds several)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("-s", "--socket", metavar="PATH",
                       help="unix socket to listen on (default: one in a new folder in $TMPDIR)")
    where.add_argument("--listen", metavar="HOST:PORT", help="listen on TCP (TLS required unless --insecure)")
    p.add_argument("--tls-certificates", metavar="DIR",
                   help="x509 folder for --listen (ca-cert.pem, server-cert.pem, server-key.pem)")
    p.add_argument("--insecure", action="store_true", help="allow --listen without TLS")
    p.add_argument("--writable", action="store_true",
                   help="accept writes into a temporary copy-on-write layer (the set is never written)")
    p.add_argument("--timeout", type=float, metavar="SECONDS", help="stop serving after SECONDS")
    p.add_argument("--json", action="store_true", help="print where it listens as one JSON line")
    p.add_argument("-t", "--threads", type=int, default=1, metavar="N",
                   help="nbdkit threads per connection (default 1: multi-conn clients get one per connection; "
                        "more only contend for the plugin's Python lock)")
    keyargs.add_arguments(p)
    p.add_argument("-v", "--verbose", action="store_true", help="debug output")
    p.add_argument("--strict", action="store_true", help="exit 2 when warnings were logged")
    p.add_argument("-V", "--version", action="version", version=f"%(prog)s {__version__}")
    return p


def _listen(value: str | None) -> tuple[str, int] | None:
    if value is None:
        return None
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise errors.UsageError(reason=f"--listen {value}: expected HOST:PORT")
    return host.strip("[]"), int(port)


def parse(argv: Sequence[str]) -> MapOptions:
    args = build_parser().parse_args(list(argv))
    listen = _listen(args.listen)
    if listen is not None and not args.insecure and not args.tls_certificates:
        raise errors.UsageError(reason="--listen serves over TCP with TLS: give --tls-certificates DIR "
                                       "(or --insecure for plain TCP)")
    if args.tls_certificates and listen is None:
        raise errors.UsageError(reason="--tls-certificates goes with --listen")
    if args.timeout is not None and args.timeout <= 0:
        raise errors.UsageError(reason="--timeout must be positive")
    if args.threads < 1:
        raise errors.UsageError(reason="--threads must be at least 1")
    return MapOptions(input=args.input, until=args.until, disk=args.disk, socket=args.socket, listen=listen,
                      timeout=args.timeout, json=args.json, writable=args.writable, insecure=args.insecure,
                      tls_certificates=args.tls_certificates, threads=args.threads, key=keyargs.key_spec(args),
                      verbose=args.verbose,
                      strict=args.strict)


def _run(options: MapOptions) -> None:
    from virtnbd.access.serve import run
    run(options)


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(PROG, argv, parse, _run)
