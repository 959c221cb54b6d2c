"""Restore drill outcomes, kept in the backup set's manifest: ``extra["drills"]`` of the point drilled.

``virtnbdrestore -a drill`` appends one record per drill through the set interface:
under the set's lock (:meth:`BackupSet.lock`) the manifest the set reads
(:meth:`BackupSet.manifest`, authenticated for an encrypted set) is rewritten whole
(:func:`virtnbd.backupset.manifest.rewrite`: atomic, checks that nothing changed it
meanwhile, an encrypted set's MAC renewed with its key). The point's data is not
touched. The newest :data:`KEEP` records of a point are kept, oldest first. A record
(docs/FORMAT.md, "Drill records")::

    {"time": "2026-12-06T01:02:03+00:00",     # when the drill started
     "result": "pass" | "fail",
     "reason": "the guest agent answered",     # without guest output (that may be private)
     "seconds": {"boot": 1.2, "agent": 3.4, "check": 0.2, "total": 6.8},
     "check": true, "check_exitcode": 0 | null}

``virtnbdprune --status`` and ``virtnbdrestore -a dump`` show the last one
(:func:`last_text`). Sets that cannot be written (virtnbdbackup folders) or a set
locked by a running backup get no record: the drill says why, and its result stands.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from virtnbd import errors
from virtnbd.backupset import encrypted
from virtnbd.backupset import manifest as bsmanifest
from virtnbd.backupset.api import BackupSet, LegacySet
from virtnbd.backupset.manifest import Point

KEY = "drills"
KEEP = 10


def record(bset: BackupSet | None, point: str, entry: Mapping[str, Any]) -> str | None:
    """Append ``entry`` to ``point``'s drill records; None once recorded, else why it was not."""
    if bset is None or bset.kind == LegacySet.kind:
        return "a virtnbdbackup folder is read only" if bset is not None else "no backup set"
    try:
        with bset.lock():
            found = bset.manifest()
            if found is None or found.point(point) is None:
                return f"point {point} is no longer in the set"
            points = tuple(_appended(p, entry) if p.name == point else p for p in found.points)
            bsmanifest.rewrite(bset.store, found, points, encrypted.manifest_key(bset))
    except errors.VirtnbdError as err:
        return str(err)
    return None


def _appended(point: Point, entry: Mapping[str, Any]) -> Point:
    extra = dict(point.extra)
    extra[KEY] = [*list(extra.get(KEY) or [])[-(KEEP - 1):], dict(entry)]
    return replace(point, extra=extra)


def last(point: Any) -> Mapping[str, Any] | None:
    """The point's newest drill record (None: never drilled)."""
    extra = point.get("extra") if isinstance(point, Mapping) else getattr(point, "extra", None)   # dump's dicts too
    found = (extra or {}).get(KEY)
    return found[-1] if isinstance(found, list | tuple) and found and isinstance(found[-1], Mapping) else None


def last_text(point: Any) -> str:
    """``pass 2026-...: reason (agent 3.4 s, total 6.8 s)``, or ``never``."""
    rec = last(point)
    if rec is None:
        return "never"
    seconds = rec.get("seconds") or {}
    times = ", ".join(f"{k} {v} s" for k, v in seconds.items() if k in ("agent", "total"))
    text = f"{rec.get('result', '?')} {rec.get('time', '?')}: {rec.get('reason', '')}"
    return text + (f" ({times})" if times else "")
