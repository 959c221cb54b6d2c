"""Drill outcomes recorded in the set's manifest (restore.drilllog) and shown by dump and prune --status.

The booting itself is tested on the lab guest (tests/system/test_instant_restore.py); here the
record: written through the set interface, data files untouched, bounded, refused on read-only
and locked sets, an encrypted set's manifest still authentic afterwards."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from tests.functional.restore_sets import SetBuilder
from tests.functional.test_encrypted_access import _chain, _clean_env  # noqa: F401 - autouse fixture
from tests.functional.test_encrypted_sets import _secret_file
from tests.functional.test_restore_legacy import _build as build_legacy
from virtnbd.backupset import encrypted
from virtnbd.backupset.api import open_set
from virtnbd.backupset.store import folder_lock
from virtnbd.cli.prune import main as prune_main
from virtnbd.cli.restore import main as restore_main
from virtnbd.crypto.keysource import KeySpec
from virtnbd.restore import drilllog
from virtnbd.restore.drill import DrillResult, record_of


def _entry(result: str, n: int = 0) -> dict[str, object]:
    return {"time": f"2026-12-06T01:{n:02d}:00+00:00", "result": result, "reason": f"reason {n}",
            "seconds": {"boot": 1.0, "agent": 3.5, "total": 7.25}, "check": False, "check_exitcode": None}


def _data(folder: str) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in Path(folder).iterdir()
            if p.name.endswith(".data")}


@pytest.fixture
def chain(tmp_path: Path) -> SetBuilder:
    b = SetBuilder(str(tmp_path / "set"), size=1 << 20, seed=3)
    b.scribble(4)
    b.full()
    b.scribble(2)
    b.inc()
    return b


def test_a_drill_is_recorded_on_its_point_and_shown(chain: SetBuilder, capsys: pytest.CaptureFixture[str]) -> None:
    before = _data(chain.folder)
    first = chain.points[0]
    assert drilllog.record(open_set(chain.folder), first, _entry("pass", 1)) is None
    assert drilllog.record(open_set(chain.folder), first, _entry("fail", 2)) is None
    found = open_set(chain.folder).manifest()
    assert found is not None
    assert [d["result"] for d in found.point(first).extra[drilllog.KEY]] == ["pass", "fail"]   # type: ignore[union-attr]
    assert drilllog.KEY not in found.points[1].extra
    assert _data(chain.folder) == before
    assert restore_main(["-i", chain.folder, "-a", "dump"]) == 0
    assert f"last drill of {first}: fail 2026-12-06T01:02:00+00:00: reason 2 (agent 3.5 s, total 7.25 s)" \
        in capsys.readouterr().out
    assert prune_main(["-i", chain.folder, "--status"]) == 0
    out = capsys.readouterr().out
    assert "last drill: fail 2026-12-06T01:02:00+00:00: reason 2" in out and out.count("last drill") == 1
    assert prune_main(["-i", chain.folder, "--status", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["chains"][0]["points"]
    assert [r["drill"].split(" ")[0] for r in rows] == ["fail", "never"]


def test_only_the_newest_records_are_kept(chain: SetBuilder) -> None:
    point = chain.points[-1]
    for n in range(drilllog.KEEP + 3):
        assert drilllog.record(open_set(chain.folder), point, _entry("pass", n)) is None
    kept = open_set(chain.folder).manifest().point(point).extra[drilllog.KEY]   # type: ignore[union-attr]
    assert [d["time"][14:16] for d in kept] == [f"{n:02d}" for n in range(3, drilllog.KEEP + 3)]


def test_read_only_and_locked_sets_get_no_record(chain: SetBuilder, tmp_path: Path) -> None:
    manifest = Path(chain.folder, "virtnbd.manifest.json")
    before = manifest.read_bytes()
    with folder_lock(Path(chain.folder)):
        why = drilllog.record(open_set(chain.folder), chain.points[0], _entry("pass"))
    assert why and "lock" in why.lower() and manifest.read_bytes() == before
    assert "no longer in the set" in (drilllog.record(open_set(chain.folder), "virtnbdbackup.9", _entry("pass")) or "")
    legacy = tmp_path / "legacy"
    build_legacy(legacy, False)
    files = sorted(p.name for p in legacy.iterdir())
    assert drilllog.record(open_set(legacy), open_set(legacy).chain(None)[-1].name, _entry("pass")) == \
        "a virtnbdbackup folder is read only"
    assert sorted(p.name for p in legacy.iterdir()) == files


def test_an_encrypted_set_stays_authentic(tmp_path: Path) -> None:
    spec = KeySpec(key_file=_secret_file(tmp_path, "key"))
    b = _chain(tmp_path / "set", spec, incs=1)
    encrypted.use_for(b.folder, spec)
    assert drilllog.record(open_set(b.folder), b.points[-1], _entry("pass")) is None
    found = open_set(b.folder).manifest()                  # authenticates with the key, or raises
    assert found is not None and drilllog.last(found.points[-1])["result"] == "pass"   # type: ignore[index]


def test_the_record_holds_no_guest_output_nor_command() -> None:
    result = DrillResult("fail", "virtnbdbackup.0", "drill-vm-1", "the check command exited 1",
                         {"boot": 1.0, "agent": 2.0, "check": 0.5}, "cat /root/secret", 1, ": top secret output")
    assert result.text == "the check command exited 1: top secret output"
    rec = record_of(result, "2026-12-06T01:00:00+00:00")
    assert rec == {"time": "2026-12-06T01:00:00+00:00", "result": "fail", "reason": "the check command exited 1",
                   "seconds": {"boot": 1.0, "agent": 2.0, "check": 0.5}, "check": True, "check_exitcode": 1}
