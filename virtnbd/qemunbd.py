"""Waiting for a local ``qemu-nbd`` to be ready.

``qemu-nbd --pid-file`` writes its pid file only after its socket listens (QEMU keeps this
order on purpose), whereas the socket file itself appears at ``bind()``, a moment before
``listen()``: a client that connects on seeing the socket can get ECONNREFUSED on a busy host.
So the starters here wait for the pid file.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import time


class NotReady(Exception):
    """qemu-nbd ended or did not get ready in time; ``reason`` is one line for the user."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def wait_ready(proc: subprocess.Popen[bytes], pidfile: str, timeout: float) -> None:
    """Return once ``pidfile`` exists (the server listens), after removing it (it has served its
    purpose; a run killed later leaves no stale pid file); raise :class:`NotReady` otherwise."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(pidfile):
        if proc.poll() is not None:
            err = (proc.stderr.read() if proc.stderr else b"").decode(errors="replace").strip()
            raise NotReady(f"qemu-nbd ended: {err.splitlines()[-1] if err else f'exit {proc.returncode}'}")
        if time.monotonic() > deadline:
            raise NotReady(f"qemu-nbd was not ready in {timeout:.0f}s")
        time.sleep(0.01)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(pidfile)
