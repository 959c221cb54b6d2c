"""Command-line options for sets in object storage (s3://BUCKET/PREFIX); secrets never come from argv."""
from __future__ import annotations

import argparse

from virtnbd import errors
from virtnbd.backupset.s3options import S3Options, configure


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("object storage (s3://BUCKET/PREFIX; credentials from the environment or ~/.aws)")
    g.add_argument("--s3-endpoint", metavar="URL", help="S3 endpoint (default: AWS_ENDPOINT_URL, else AWS)")
    g.add_argument("--s3-profile", metavar="NAME", help="profile of ~/.aws/credentials and ~/.aws/config")
    g.add_argument("--s3-ca-bundle", metavar="FILE", help="CA certificates to check the endpoint's TLS certificate")
    g.add_argument("--s3-timeout", type=int, default=60, metavar="SEC",
                   help="seconds before an S3 request counts as failed (default 60)")


def s3_options(args: argparse.Namespace) -> S3Options:
    if args.s3_timeout < 1:
        raise errors.UsageError(reason="--s3-timeout must be at least 1 second")
    endpoint = args.s3_endpoint
    if endpoint and "@" in endpoint.partition("://")[2].partition("/")[0]:
        raise errors.UsageError(reason="--s3-endpoint must not hold credentials (use the environment or ~/.aws)")
    return S3Options(endpoint=endpoint, profile=args.s3_profile, ca_bundle=args.s3_ca_bundle,
                     connect_timeout=min(10, args.s3_timeout), read_timeout=args.s3_timeout)


def apply(options: S3Options) -> None:
    """Use ``options`` for every s3:// store this process opens."""
    configure(options)
