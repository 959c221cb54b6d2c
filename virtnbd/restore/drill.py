"""``virtnbdrestore -a drill``: prove a backup point boots, then throw everything away.

The point is booted as a transient domain (new name, no UUID, new MACs, no network
card at all) on overlays over its NBD exports (``live.booted``); the drill waits for
the guest agent's answer, runs ``--check`` in the guest through the agent when given
(pass: exit status 0), and tears down the domain, nbdkit, overlays and consoles
whatever happened. The backup set is only read. The result (pass/fail, reason,
timings) is printed, as one JSON object with ``--json``; a failed drill exits 1.
"""
from __future__ import annotations

import json
import logging
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field

from virtnbd import errors
from virtnbd.restore import live
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
    reason: str
    seconds: dict[str, float] = field(default_factory=dict)   # boot, agent, check, total
    check: str | None = None
    check_exitcode: int | None = None


def run(selection: Selection, options: RestoreOptions) -> None:
    started = time.monotonic()
    result = drill(selection, options, started)
    result.seconds["total"] = round(time.monotonic() - started, 2)     # teardown included
    if options.json:
        sys.stdout.write(json.dumps(asdict(result)) + "\n")
    else:
        times = ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items())
        sys.stdout.write(f"drill {result.result}: point {result.point} as {result.domain}: {result.reason} "
                         f"({times}); torn down\n")
    sys.stdout.flush()
    if result.result != "pass":
        raise DrillFailed(reason=result.reason)


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
            reason = f"{err}" + (f"; console: {tail}" if tail else "")
            return _done(point, name, "fail", reason, seconds, options)
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
    return _done(point, name, "fail", f"the check command exited {ran.exitcode}" + (f": {out}" if out else ""),
                 seconds, options, code=ran.exitcode)


def _done(point: str, name: str, result: str, reason: str, seconds: dict[str, float], options: RestoreOptions,  # noqa: PLR0917
          *, code: int | None = None) -> DrillResult:
    log.debug("drill %s: %s", result, reason)
    return DrillResult(result, point, name, reason, seconds, options.check, code)
