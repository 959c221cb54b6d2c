"""--renew N|DURATION (pure) and the retention options of virtnbdbackup."""
from __future__ import annotations

import datetime as dt
from types import SimpleNamespace

import pytest

from virtnbd import errors
from virtnbd.backup.renew import Renew, due, parse
from virtnbd.cli.backup import parse as parse_backup
from virtnbd.retention.policy import Duration, Policy


def _chain(full_time: str, incs: int) -> SimpleNamespace:
    points = [SimpleNamespace(level="full", time=full_time)]
    points += [SimpleNamespace(level="inc", time=full_time)] * incs
    points.append(SimpleNamespace(level="diff", time=full_time))
    return SimpleNamespace(points=points)


NOW = dt.datetime(2026, 3, 1, 2, 0, tzinfo=dt.UTC)


def test_renew_after_n_incs() -> None:
    assert due(Renew(incs=6), _chain("2026-02-25T02:00:00+00:00", 5), NOW) is None
    assert "6 incrementals" in (due(Renew(incs=6), _chain("2026-02-25T02:00:00+00:00", 6), NOW) or "")


def test_renew_by_age_of_the_full() -> None:
    # 2026-03-01 02:00 - 1 month = 2026-02-01 02:00: a full of that moment or older is due
    assert due(Renew(age=Duration(months=1)), _chain("2026-02-01T02:00:01+00:00", 30), NOW) is None
    assert due(Renew(age=Duration(months=1)), _chain("2026-02-01T02:00:00+00:00", 30), NOW) is not None
    assert due(None, _chain("2020-01-01T00:00:00+00:00", 99), NOW) is None
    assert due(Renew(incs=1), None, NOW) is None


def test_parse_renew() -> None:
    assert parse("30") == Renew(incs=30)
    assert parse("1m") == Renew(age=Duration(months=1))
    with pytest.raises(errors.UsageError):
        parse("0")
    with pytest.raises(errors.UsageError):
        parse("soon")


def test_backup_cli_retention_options() -> None:
    opts = parse_backup(["-d", "vm", "-l", "auto", "-o", "/b", "--renew", "1m", "--keep-daily", "7",
                         "--keep-monthly", "3", "--merge"])
    assert opts.renew == Renew(age=Duration(months=1))
    assert opts.keep == Policy(daily=7, monthly=3) and opts.merge
    assert parse_backup(["-d", "vm", "-l", "inc", "-o", "/b"]).keep is None
    with pytest.raises(errors.UsageError):
        parse_backup(["-d", "vm", "-l", "inc", "-o", "/b", "--renew", "3"])
    with pytest.raises(errors.UsageError):
        parse_backup(["-d", "vm", "-l", "auto", "-o", "/b", "--merge"])
