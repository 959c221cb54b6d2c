"""The frozen record of what one virtnbdprune run should do (built by cli/prune.py)."""
from __future__ import annotations

from dataclasses import dataclass, field

from virtnbd.crypto.keysource import KeySpec
from virtnbd.retention.policy import Policy


@dataclass(frozen=True)
class PruneOptions:
    input: str
    policy: Policy
    status: bool = False
    consolidate: str | None = None     # merge the chain up to this point into a synthetic full
    merge: bool = False                # policy: merge points only kept points need (else keep them)
    dry_run: bool = False
    json: bool = False
    worker: int = 4
    key: KeySpec = field(default_factory=KeySpec)   # encrypted chains: where the secret is (never the secret)
    verbose: bool = False
    strict: bool = False
