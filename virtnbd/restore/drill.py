"""``virtnbdrestore -a drill``: prove a backup point boots, then throw everything away.

The point is booted as a transient domain (new name, no UUID, new MACs, no network
card at all) on overlays over its NBD exports (``live.booted``); the drill waits for
the guest agent's answer, runs ``--check`` in the guest through the agent when given
(pass: exit status 0), and tears down the domain, nbdkit, overlays and consoles
whatever happened. The backup set's data is only read. The result (pass/fail, reason,
timings) is printed, as one JSON object with ``--json``, and recorded in the set's
manifest (``restore.drilllog``); a failed drill exits 1.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field

from virtnbd import errors
from virtnbd.restore import drilllog, live
from virtnbd.restore.options import RestoreOptions
from virtnbd.restore.source import Selection
from virtnbd.virt.guestexec import run_shell, wait_agent

log = logging.getLogger(__name__)


class DrillFailed(errors.RestoreError):
    template = "drill failed: {reason}"


@dataclass(frozen=True)
class DrillResult:
    result: str                         # pass | fail
    point: str
    domain: str
    reason: str                         # printed with ``detail`` appended
    seconds: dict[str, float] = field(default_factory=dict)   # boot, agent, check, total
    check: str | None = None
    check_exitcode: int | None = None
    detail: str = ""                    # "; console: ..." / ": <check output>": printed, not recorded

    @property
    def text(self) -> str:
        return self.reason + self.detail


def run(selection: Selection, options: RestoreOptions) -> None:
    started = time.monotonic()
    when = dt.datetime.now(dt.UTC).astimezone().isoformat(timespec="seconds")
    result = drill(selection, options, started)
    result.seconds["total"] = round(time.monotonic() - started, 2)     # teardown included
    not_recorded = drilllog.record(selection.bset, result.point, record_of(result, when))
    if not_recorded:
        log.warning("drill result not recorded in the backup set: %s", not_recorded)
    if options.json:
        doc = {**asdict(result), "reason": result.text, "time": when, "recorded": not_recorded is None}
        doc.pop("detail")
        sys.stdout.write(json.dumps(doc) + "\n")
    else:
        times = ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items())
        sys.stdout.write(f"drill {result.result}: point {result.point} as {result.domain}: {result.text} "
                         f"({times}); torn down\n")
    sys.stdout.flush()
    if result.result != "pass":
        raise DrillFailed(reason=result.text)


def record_of(result: DrillResult, when: str) -> dict[str, object]:
    """The record kept in the set (docs/FORMAT.md): no guest output, no command text."""
    return {"time": when, "result": result.result, "reason": result.reason, "seconds": dict(result.seconds),
            "check": result.check is not None, "check_exitcode": result.check_exitcode}


def drill(selection: Selection, options: RestoreOptions, started: float) -> DrillResult:
    xml = live.saved_xml(selection)
    name = options.name or f"drill-{live.domain_name(xml, None, '')}-{uuid.uuid4().hex[:6]}"
    point = selection.points[-1].name
    plan = live.LivePlan(name=name, uri=options.uri, work_parent=options.output or tempfile.gettempdir(),
                         persistent=False, isolated=True)
    seconds: dict[str, float] = {}
    with live.booted(selection, plan, started) as booted:
        seconds["boot"] = round(booted.seconds, 2)
        try:
            seconds["agent"] = round(wait_agent(booted.dom, options.boot_timeout), 2)
        except errors.AgentError as err:
            tail = booted.console_tail()
            return _done(point, name, "fail", f"{err}", seconds, options, detail=f"; console: {tail}" if tail else "")
        if not options.check:
            return _done(point, name, "pass", "the guest agent answered", seconds, options)
        t0 = time.monotonic()
        try:
            ran = run_shell(booted.dom, options.check, options.boot_timeout)
        except errors.AgentError as err:
            return _done(point, name, "fail", f"check command: {err}", seconds, options)
        seconds["check"] = round(time.monotonic() - t0, 2)
    if ran.exitcode == 0:
        return _done(point, name, "pass", "the check command exited 0", seconds, options, code=0)
    out = " ".join((ran.stderr or ran.stdout).split())
    return _done(point, name, "fail", f"the check command exited {ran.exitcode}", seconds, options,
                 code=ran.exitcode, detail=f": {out}" if out else "")


def _done(point: str, name: str, result: str, reason: str, seconds: dict[str, float], options: RestoreOptions,  # noqa: PLR0917
          *, code: int | None = None, detail: str = "") -> DrillResult:
    log.debug("drill %s: %s %s", result, reason, detail)
    return DrillResult(result, point, name, reason, seconds, options.check, code, detail)
