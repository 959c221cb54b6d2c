"""The last verify result of each point, kept next to the manifest (``virtnbd.verify.json``).

Prune and consolidation verify the newest point of a chain before they remove
anything from it and record the outcome here; ``--status`` shows it. The file
moves with its chain when the chain is archived. Schema:
``{"points": {"<point>": {"time": ISO, "ok": bool, "error": str}}}``.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
from dataclasses import dataclass

from virtnbd import errors
from virtnbd.backupset.store import Store

log = logging.getLogger(__name__)

FILE = "virtnbd.verify.json"
TRUSTED = dt.timedelta(hours=24)    # an ok record younger than this is not verified again before a prune


@dataclass(frozen=True)
class Result:
    point: str
    time: str
    ok: bool
    error: str = ""


def load(store: Store) -> dict[str, Result]:
    try:
        data = store.read_bytes(FILE)
        if data is None:
            return {}
        points = json.loads(data)["points"]
        return {name: Result(name, str(r["time"]), bool(r["ok"]), str(r.get("error", "")))
                for name, r in points.items()}
    except (errors.VirtnbdError, OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        log.warning("%s: unreadable verify record (%s): treated as never verified", store.describe(FILE), err)
        return {}


def record(store: Store, result: Result, keep: set[str] | None = None) -> None:
    """Store ``result``; with ``keep``, drop records of points no longer in the chain."""
    known = load(store)
    known[result.point] = result
    if keep is not None:
        known = {k: v for k, v in known.items() if k in keep or k == result.point}
    doc = {"points": {k: {"time": v.time, "ok": v.ok, "error": v.error} for k, v in sorted(known.items())}}
    store.replace(FILE, (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode())


def verify_point(store: Store, point: str, workers: int = 4) -> Result:
    """Verify every file the point needs (its chain back to the full); record and return the outcome."""
    from virtnbd.restore import verify
    from virtnbd.restore.source import select
    now = dt.datetime.now(dt.UTC).astimezone().isoformat(timespec="seconds")
    try:
        selection = select(store.location, point, None)
        verify.run(selection, workers=workers)
        result = Result(point, now, True)
    except errors.VirtnbdError as err:
        result = Result(point, now, False, str(err))
    record(store, result)
    return result


def recent_ok(store: Store, point: str, now: dt.datetime | None = None) -> Result | None:
    """The point's ok record when younger than :data:`TRUSTED` (None: verify it)."""
    found = load(store).get(point)
    if found is None or not found.ok:
        return None
    try:
        when = dt.datetime.fromisoformat(found.time)
    except ValueError:
        return None
    now = now or dt.datetime.now(dt.UTC)
    return found if when.tzinfo is not None and dt.timedelta(0) <= now - when < TRUSTED else None
