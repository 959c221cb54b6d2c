"""Retention policy table: the kept sets below were worked out by hand from restic's documented
``forget`` rules (newest first; keep-last N = N newest; keep-<period> N = newest point of each of the
last N distinct periods holding points; keep-within D = newer than newest - D), not from the code.

Calendar facts used (from ``date``): 2026-06-08 is Monday of ISO week 2026-W24; 2026-06-07 (Sunday),
2026-06-02 and 2026-06-01 are in 2026-W23; 2026-03-31 is in 2026-W14; 2026-01-01 AND 2025-12-31 are
both in ISO week 2026-W01; 2025-06-15 is in 2025-W24.
"""
from __future__ import annotations

import pytest

from virtnbd import errors
from virtnbd.retention.policy import Duration, Link, Policy, Stamp, decide, needed_by, parse_duration, parse_time

TIMES = {
    "a": "2025-01-05T10:00:00+00:00",
    "b": "2025-01-20T10:00:00+00:00",
    "c": "2025-02-10T10:00:00+00:00",
    "d": "2025-06-15T10:00:00+00:00",
    "e": "2025-12-31T22:00:00+00:00",
    # recorded at +02:00: 2025-12-31 23:00 UTC, but the first hour of 2026 where it was taken
    "f": "2026-01-01T01:00:00+02:00",
    "g": "2026-03-31T12:00:00+00:00",
    "h": "2026-06-01T08:00:00+00:00",
    "i": "2026-06-01T20:00:00+00:00",
    "j": "2026-06-02T08:00:00+00:00",
    "k": "2026-06-07T08:00:00+00:00",
    "l": "2026-06-08T08:00:00+00:00",
    "m": "2026-06-08T09:30:00+00:00",
    "n": "2026-06-08T09:45:00+00:00",
    "o": "2026-06-08T10:15:00+00:00",
}
POINTS = [Stamp(name, parse_time(t)) for name, t in TIMES.items()]

TABLE = [
    (Policy(last=3), "onm"),
    # hours: o 10h, n 09h (m same hour), l 08h
    (Policy(hourly=3), "onl"),
    # days: o 06-08 (n, m, l same day), k 06-07, j 06-02, i 06-01 (newer than h)
    (Policy(daily=4), "okji"),
    # weeks: o W24, k W23 (j, i, h same), g W14, f 2026-W01 (e is in the same ISO week), d 2025-W24
    (Policy(weekly=3), "okg"),
    (Policy(weekly=5), "okgfd"),
    # months: o 2026-06, g 2026-03, f 2026-01 (in its own zone), e 2025-12
    (Policy(monthly=4), "ogfe"),
    # years: only two hold points: o (2026), e (2025; f is 2026 where it was taken)
    (Policy(yearly=3), "oe"),
    # newest o 2026-06-08 10:15 - 1y2m3d4h = 2025-04-05 06:15: d and newer
    (Policy(within=Duration(1, 2, 3, 4)), "defghijklmno"),
    # union of rules: last o n; daily o k; monthly o g; yearly o e
    (Policy(last=2, daily=2, monthly=2, yearly=5), "onkge"),
    # unlimited days: newest of every day that has points (h shares 06-01 with i; l, m, n share with o)
    (Policy(daily=-1), "okjigfedcba"),
    (Policy(), ""),
]


@pytest.mark.parametrize(("policy", "expected"), TABLE, ids=[p.describe() for p, _ in TABLE])
def test_kept_sets_follow_restic_rules(policy: Policy, expected: str) -> None:
    kept = {name for name, why in decide(POINTS, policy).items() if why}
    assert kept == set(expected)


def test_every_rule_that_keeps_a_point_is_named() -> None:
    why = decide(POINTS, Policy(last=2, daily=2, monthly=2, yearly=5))
    assert why["o"] == ("last", "daily 2026-06-08", "monthly 2026-06", "yearly 2026")
    assert why["e"] == ("yearly 2025",)
    assert why["a"] == ()


def test_within_rolls_over_month_ends_like_restic() -> None:
    # 2026-03-31 12:00 - 1 month = "2026-02-31" = 2026-03-03 12:00 (Go AddDate); keep strictly after
    points = [Stamp("new", parse_time("2026-03-31T12:00:00+00:00")),
              Stamp("in", parse_time("2026-03-03T13:00:00+00:00")),
              Stamp("edge", parse_time("2026-03-03T12:00:00+00:00")),
              Stamp("out", parse_time("2026-03-02T12:00:00+00:00"))]
    kept = {n for n, why in decide(points, Policy(within=parse_duration("1m"))).items() if why}
    assert kept == {"new", "in"}


@pytest.mark.parametrize(("text", "expected"), [("1y2m3d4h", Duration(1, 2, 3, 4)), ("30d", Duration(days=30)),
                                                 ("12h", Duration(hours=12)), ("6M", Duration(months=6))])
def test_durations(text: str, expected: Duration) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "1w", "d", "1d2y", "-1d", "1.5d"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(errors.UsageError):
        parse_duration(text)


LINKS = [Link("full", "full", None), Link("i1", "inc", "full"), Link("i2", "inc", "i1"),
         Link("d1", "diff", "i1"), Link("i3", "inc", "i2")]


def test_a_kept_point_needs_its_parents_back_to_the_full() -> None:
    assert needed_by(LINKS, ["i2"]) == {"i1": "i2", "full": "i2"}
    assert needed_by(LINKS, ["d1"]) == {"i1": "d1", "full": "d1"}
    assert needed_by(LINKS, ["i3", "d1"]) == {"i2": "i3", "i1": "i3", "full": "i3"}
    assert needed_by(LINKS, ["full", "d1"]) == {"i1": "d1"}
    assert needed_by(LINKS, []) == {}


def test_a_missing_parent_is_an_error() -> None:
    with pytest.raises(errors.ChainError):
        needed_by([Link("i1", "inc", "gone")], ["i1"])


def test_equal_times_the_later_point_is_newer() -> None:
    same = parse_time("2026-06-08T10:15:00+00:00")
    points = [Stamp("archived", same), Stamp("current", same)]
    assert {n for n, why in decide(points, Policy(last=1)).items() if why} == {"current"}
