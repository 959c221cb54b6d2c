"""Waiting for a guest agent and running a command in the guest through it (``guest-exec``)."""
from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass

import libvirt
import libvirt_qemu

from virtnbd import errors
from virtnbd.virt.agent import ping

POLL = 0.3
TAIL = 400          # characters of a command's output kept for messages


@dataclass(frozen=True)
class GuestRun:
    exitcode: int
    stdout: str
    stderr: str


def wait_agent(dom: libvirt.virDomain, timeout: float) -> float:
    """Seconds until the guest agent answered ``guest-ping``; AgentError when the domain stops or time runs out."""
    started = time.monotonic()
    last = "no answer yet"
    while time.monotonic() - started < timeout:
        if not dom.isActive():
            raise errors.AgentError(reason=f"domain {dom.name()} stopped while booting")
        try:
            ping(dom, 5)
            return time.monotonic() - started
        except errors.AgentError as err:
            last = str(err)
        time.sleep(POLL)
    raise errors.AgentError(reason=f"the guest agent of {dom.name()} did not answer within {timeout:g} s ({last})")


def _command(dom: libvirt.virDomain, execute: str, arguments: dict[str, object]) -> dict[str, object]:
    msg = json.dumps({"execute": execute, "arguments": arguments})
    try:
        answer = json.loads(libvirt_qemu.qemuAgentCommand(dom, msg, 10, 0))
    except libvirt.libvirtError as err:
        raise errors.AgentError(reason=f"{execute}: {err.get_error_message()}") from err
    result = answer.get("return")
    if not isinstance(result, dict):
        raise errors.AgentError(reason=f"{execute}: unexpected answer {answer!r}")
    return result


def _text(status: dict[str, object], key: str) -> str:
    data = status.get(key)
    return base64.b64decode(data).decode(errors="replace")[-TAIL:] if isinstance(data, str) else ""


def run_shell(dom: libvirt.virDomain, script: str, timeout: float) -> GuestRun:
    """``/bin/sh -c script`` in the guest; its exit code and the tails of its output."""
    pid = _command(dom, "guest-exec", {"path": "/bin/sh", "arg": ["-c", script], "capture-output": True})["pid"]
    deadline = time.monotonic() + timeout
    while True:
        status = _command(dom, "guest-exec-status", {"pid": pid})
        if status.get("exited"):
            code = status.get("exitcode", status.get("signal", -1))
            return GuestRun(int(code) if isinstance(code, int) else -1, _text(status, "out-data"),
                            _text(status, "err-data"))
        if time.monotonic() > deadline:
            raise errors.AgentError(reason=f"the check command still runs after {timeout:g} s")
        time.sleep(POLL / 3)
