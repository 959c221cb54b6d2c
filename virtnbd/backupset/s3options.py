"""How to reach s3:// stores: the frozen options the command line gives (no boto3 here).

``cli/s3args.py`` builds :class:`S3Options` and calls :func:`configure`; the object store
(``backupset/s3store.py``, the only module that imports boto3) is loaded by the store
registry (``backupset/store.py``) when an ``s3://`` location is opened, and reads them
with :func:`configured`. A command on a local folder never imports boto3/botocore.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class S3Options:
    """How to reach the store; secrets only come from the environment or ~/.aws (boto3's rules)."""

    endpoint: str | None = None        # --s3-endpoint, else AWS_ENDPOINT_URL
    profile: str | None = None         # --s3-profile (~/.aws/credentials section)
    ca_bundle: str | None = None       # --s3-ca-bundle
    region: str | None = None
    connect_timeout: float = 10
    read_timeout: float = 60
    attempts: int = 3                  # total attempts per request (botocore "standard" retries)
    concurrency: int = 2               # parts / ranged GETs in flight


class _Defaults:
    options = S3Options()


def configure(options: S3Options) -> None:
    """Endpoint, profile, CA bundle and timeouts for the s3:// stores this process opens (set by the CLI)."""
    _Defaults.options = options


def configured() -> S3Options:
    return _Defaults.options
