"""barc-style ``--renew N|DURATION``: when ``-l auto`` starts a new chain although the old one could go on.

``N`` (a count): after N incrementals since the full. A duration (``1m``, ``30d``,
``1y2m3d4h``): once the full is that old. The old chain is moved aside into
``chain-<time>/`` the way a broken chain is (``archive.archive``). Pure logic here.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from virtnbd import errors
from virtnbd.retention.policy import Duration, parse_duration, parse_time


@dataclass(frozen=True)
class Renew:
    incs: int | None = None
    age: Duration | None = None

    def __str__(self) -> str:
        return f"{self.incs} incs" if self.incs is not None else f"age {self.age}"


def parse(text: str) -> Renew:
    if text.strip().isdigit():
        count = int(text)
        if count < 1:
            raise errors.UsageError(reason="--renew N needs N >= 1")
        return Renew(incs=count)
    return Renew(age=parse_duration(text))


def due(renew: Renew | None, manifest: Any, now: dt.datetime) -> str | None:
    """Why the chain must be renewed now (None: continue it)."""
    if renew is None or manifest is None:
        return None
    heads = [p for p in manifest.points if p.level in ("full", "inc")]
    if not heads or heads[0].level != "full":
        return None
    incs = sum(1 for p in heads if p.level == "inc")
    if renew.incs is not None and incs >= renew.incs:
        return f"the chain has {incs} incrementals (--renew {renew.incs})"
    if renew.age is not None and renew.age.before(now) >= parse_time(heads[0].time):
        return f"the full backup of {heads[0].time} is older than {renew.age} (--renew {renew.age})"
    return None
