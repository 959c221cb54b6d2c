"""virtnbdprune: argv -> frozen PruneOptions -> retention (policy, prune, consolidation, status)."""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from virtnbd import __version__, errors
from virtnbd.cli import keyargs, locations, s3args
from virtnbd.cli.shell import OneLineParser, run_main
from virtnbd.retention.options import PruneOptions
from virtnbd.retention.policy import PERIODS, Duration, Policy, parse_duration

PROG = "virtnbdprune"


def add_policy_arguments(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """--keep-* options (virtnbdprune and virtnbdbackup share them)."""
    p.add_argument("--keep-last", type=int, default=0, metavar="N", help="keep the N newest points")
    for period in PERIODS:
        unit = {"hourly": "hour", "daily": "day", "weekly": "ISO week", "monthly": "month", "yearly": "year"}[period]
        p.add_argument(f"--keep-{period}", type=int, default=0, metavar="N",
                       help=f"keep the newest point of each of the last N {unit}s that have points (-1: all)")
    p.add_argument("--keep-within", type=_duration, default=None, metavar="DURATION",
                   help="keep every point newer than the newest point minus DURATION (e.g. 30d, 6m, 1y2m3d4h)")
    p.add_argument("--merge", action="store_true",
                   help="consolidate points that only kept points need into a synthetic full "
                        "(default: keep them)")


def _duration(text: str) -> Duration:
    try:
        return parse_duration(text)
    except errors.UsageError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def policy_of(args: argparse.Namespace) -> Policy:
    counts = {"last": args.keep_last, **{p: getattr(args, f"keep_{p}") for p in PERIODS}}
    bad = [k for k, v in counts.items() if v < -1]
    if bad:
        raise errors.UsageError(reason=f"--keep-{bad[0]} must be a count (or -1 for unlimited)")
    return Policy(within=args.keep_within, **counts)


def build_parser() -> OneLineParser:
    p = OneLineParser(prog=PROG, description="Retention for virtnbd backup sets: apply --keep-* policies to "
                      "every chain under a backup folder, consolidate chains, show their status.",
                      epilog="Exit codes: 0 ok, 1 error, 2 warnings with --strict, 128+N on signal N.")
    p.add_argument("-i", "--input", required=True, metavar="SET_OR_ROOT",
                   help="backup folder (the -o of virtnbdbackup, with its chain-* archives) or one chain folder")
    add_policy_arguments(p)
    p.add_argument("--consolidate", metavar="POINT",
                   help="merge every point up to POINT into a synthetic full at POINT")
    p.add_argument("--status", action="store_true", help="list every chain and point with sizes and verify results")
    p.add_argument("--dry-run", action="store_true", help="print what would be kept, merged, removed and why")
    p.add_argument("--json", action="store_true", help="--status/--dry-run/prune: print JSON")
    p.add_argument("-w", "--worker", type=int, default=4, metavar="N", help="threads for verify/consolidation")
    keyargs.add_arguments(p)
    p.add_argument("-v", "--verbose", action="store_true", help="debug output")
    p.add_argument("--strict", action="store_true", help="exit 2 when warnings were logged")
    p.add_argument("-V", "--version", action="version", version=f"%(prog)s {__version__}")
    s3args.add_arguments(p)
    return p


def parse(argv: Sequence[str]) -> PruneOptions:
    args = build_parser().parse_args(list(argv))
    policy = policy_of(args)
    modes = [bool(args.status), bool(args.consolidate), not policy.empty]
    if sum(modes) != 1:
        raise errors.UsageError(reason="give one of: --keep-* rules, --consolidate POINT, --status")
    if args.worker < 1:
        raise errors.UsageError(reason="--worker must be at least 1")
    locations.check(args.input, "prune-input", "-i/--input")
    s3args.apply(s3args.s3_options(args))
    if args.dry_run and policy.empty:
        raise errors.UsageError(reason="--dry-run goes with --keep-* rules")
    if args.merge and policy.empty:
        raise errors.UsageError(reason="--merge goes with --keep-* rules")
    return PruneOptions(input=args.input, policy=policy, status=args.status, consolidate=args.consolidate,
                        merge=args.merge, dry_run=args.dry_run, json=args.json, worker=args.worker,
                        key=keyargs.key_spec(args), verbose=args.verbose, strict=args.strict)


def _run(options: PruneOptions) -> None:
    from virtnbd.retention import prune, status
    if options.status:
        status.show(status.rows(options.input), sys.stdout, options.json)
    elif options.consolidate:
        result = prune.consolidate_until(options.input, options.consolidate, options.worker, options.key)
        if options.json:
            json.dump(result.__dict__, sys.stdout, indent=1)
            sys.stdout.write("\n")
    else:
        plans = prune.run(options.input, options.policy, merge=options.merge, dry_run=options.dry_run,
                          workers=options.worker, key=options.key)
        if options.dry_run or options.json:
            status.show_decisions([d for cp in plans for d in cp.decisions], sys.stdout, options.json)
    sys.stdout.flush()


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(PROG, argv, parse, _run)


if __name__ == "__main__":
    sys.exit(main())
