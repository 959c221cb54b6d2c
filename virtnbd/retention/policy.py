"""Retention policies with restic ``forget`` semantics, made chain-aware. Pure logic.

Rules (restic's documented ``forget`` rules; points are sorted newest first):

* ``keep_last N`` keeps the N newest points.
* ``keep_<period> N`` (hourly, daily, weekly, monthly, yearly) keeps the newest
  point of each of the last N distinct periods that hold points. Periods:
  hour = date + hour, day = date, week = ISO year + ISO week, month, year,
  all taken in the time zone each point's time was recorded in. N = -1
  means unlimited.
* ``keep_within D`` keeps every point newer than (newest point's time - D);
  D is ``1y2m3d4h`` style (years, months, days, hours; calendar arithmetic).

A point is kept when any rule keeps it; each kept point is tagged with every
rule that keeps it. :func:`needed_by` then adds what the kept points need to
restore: an inc needs its parent and, through it, every point back to the
full; a diff needs its parent. Those points are "needed", not "kept": a
consolidation can merge them into a synthetic full so that they are no
longer needed.
"""
from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from virtnbd import errors

PERIODS = ("hourly", "daily", "weekly", "monthly", "yearly")
UNLIMITED = -1
_DURATION = re.compile(r"^(?:(\d+)y)?(?:(\d+)m)?(?:(\d+)d)?(?:(\d+)h)?$")


@dataclass(frozen=True)
class Duration:
    years: int = 0
    months: int = 0
    days: int = 0
    hours: int = 0

    def before(self, t: dt.datetime) -> dt.datetime:
        """``t`` minus this duration, as restic computes it (Go's ``AddDate``: a day past a
        month's end rolls over, 31 March - 1 month = 3 March)."""
        months = t.year * 12 + (t.month - 1) - self.years * 12 - self.months
        year, month = divmod(months, 12)
        first = t.replace(year=year, month=month + 1, day=1)
        return first + dt.timedelta(days=t.day - 1 - self.days, hours=-self.hours)

    def __str__(self) -> str:
        parts = zip((self.years, self.months, self.days, self.hours), "ymdh", strict=True)
        return "".join(f"{n}{u}" for n, u in parts if n) or "0h"


def parse_duration(text: str) -> Duration:
    """``1y2m3d4h``, any part optional but at least one (``30d``, ``6m``, ``12h``)."""
    m = _DURATION.match(text.strip().lower())
    if not m or not any(m.groups()):
        raise errors.UsageError(reason=f"not a duration: {text!r} (examples: 30d, 6m, 1y2m3d4h)")
    return Duration(*(int(g or 0) for g in m.groups()))


@dataclass(frozen=True)
class Policy:
    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0
    within: Duration | None = None

    @property
    def empty(self) -> bool:
        return not (self.last or any(getattr(self, p) for p in _FIELDS) or self.within)

    def describe(self) -> str:
        parts = [f"keep-last {self.last}"] if self.last else []
        parts += [f"keep-{p} {getattr(self, _FIELDS[p])}" for p in PERIODS if getattr(self, _FIELDS[p])]
        if self.within:
            parts.append(f"keep-within {self.within}")
        return ", ".join(parts) or "no rule"


_FIELDS = {"hourly": "hourly", "daily": "daily", "weekly": "weekly", "monthly": "monthly", "yearly": "yearly"}


def _bucket(period: str) -> Callable[[dt.datetime], tuple[int, ...]]:
    if period == "hourly":
        return lambda t: (t.year, t.month, t.day, t.hour)
    if period == "daily":
        return lambda t: (t.year, t.month, t.day)
    if period == "weekly":
        return lambda t: tuple(t.isocalendar()[:2])
    if period == "monthly":
        return lambda t: (t.year, t.month)
    return lambda t: (t.year,)


@dataclass(frozen=True)
class Stamp:
    """One point as the policy sees it."""

    name: str
    time: dt.datetime


def parse_time(text: str) -> dt.datetime:
    try:
        t = dt.datetime.fromisoformat(text)
    except ValueError as err:
        raise errors.ChainError(reason=f"point time {text!r} is not ISO 8601") from err
    return t if t.tzinfo is not None else t.replace(tzinfo=dt.UTC)


def decide(points: Sequence[Stamp], policy: Policy) -> dict[str, tuple[str, ...]]:
    """Rules that keep each point (empty tuple: no rule keeps it), for every point given (oldest first)."""
    # newest first; equal times (points taken within one second): the later one in the given order is newer
    ordered = [p for _, p in sorted(enumerate(points), key=lambda ip: (ip[1].time, ip[0]), reverse=True)]
    reasons: dict[str, list[str]] = {p.name: [] for p in points}
    for p in ordered[:policy.last] if policy.last >= 0 else ordered:
        reasons[p.name].append("last")
    for period in PERIODS:
        _keep_periods(ordered, getattr(policy, _FIELDS[period]), period, reasons)
    if policy.within is not None and ordered:
        since = policy.within.before(ordered[0].time)
        for p in ordered:
            if p.time > since:
                reasons[p.name].append(f"within {policy.within}")
    return {name: tuple(r) for name, r in reasons.items()}


def _keep_periods(ordered: Sequence[Stamp], count: int, period: str, reasons: dict[str, list[str]]) -> None:
    bucket = _bucket(period)
    last: tuple[int, ...] | None = None
    left = count
    for p in ordered:
        if left == 0:
            return
        value = bucket(p.time)
        if value != last:
            reasons[p.name].append(f"{period} {_label(period, p.time)}")
            last = value
            left -= 1


def _label(period: str, t: dt.datetime) -> str:
    if period == "weekly":
        year, week, _ = t.isocalendar()
        return f"{year}-W{week:02d}"
    formats = {"hourly": "%Y-%m-%d %H:00", "daily": "%Y-%m-%d", "monthly": "%Y-%m", "yearly": "%Y"}
    return t.strftime(formats[period])


@dataclass(frozen=True)
class Link:
    """One point's place in its chain."""

    name: str
    level: str            # copy | full | inc | diff
    parent: str | None


def needed_by(links: Sequence[Link], kept: Sequence[str]) -> dict[str, str]:
    """Points a kept point needs to restore (not kept themselves) -> the kept point that needs them.

    The newest kept point that needs a point names it (its whole parent path, back to the full).
    """
    by_name: Mapping[str, Link] = {link.name: link for link in links}
    order = {link.name: i for i, link in enumerate(links)}
    keep = set(kept)
    needed: dict[str, str] = {}
    for name in sorted(keep, key=lambda n: order.get(n, -1), reverse=True):
        link = by_name.get(name)
        while link is not None and link.parent is not None:
            parent = by_name.get(link.parent)
            if parent is None:
                raise errors.ChainError(reason=f"point {link.name}: parent {link.parent} is not in the chain")
            if parent.name not in keep:
                needed.setdefault(parent.name, name)
            link = parent
    return needed
