"""``--hook CMD``: an admin's command run at each phase with the outcome in VIRTNBD_* variables.

Phases: ``start`` (before a domain; a non-zero exit skips it), ``done``
(after each domain, whatever the outcome), ``failure`` (after a failed
domain), ``end`` (once, after every domain). The command is split like a
shell would (no shell runs it); its output goes to our stderr.
"""
from __future__ import annotations

import logging
import os
import shlex
import subprocess
from collections.abc import Mapping

log = logging.getLogger(__name__)

PHASES = ("start", "done", "failure", "end")
TIMEOUT = 600


def call(command: str | None, phase: str, fields: Mapping[str, object]) -> int:
    """Run the hook for ``phase``; its exit code (0 when there is no hook)."""
    if not command:
        return 0
    env = dict(os.environ)
    env["VIRTNBD_PHASE"] = phase
    for key, value in fields.items():
        env[f"VIRTNBD_{key.upper()}"] = "" if value is None else str(value)
    try:
        done = subprocess.run(shlex.split(command), env=env, stdin=subprocess.DEVNULL, timeout=TIMEOUT,
                              check=False)
    except (OSError, ValueError, subprocess.TimeoutExpired) as err:
        log.warning("hook %s (%s) failed to run: %s", command, phase, err)
        return 127
    if done.returncode != 0:
        log.warning("hook %s (%s) exited %d", command, phase, done.returncode)
    return done.returncode
