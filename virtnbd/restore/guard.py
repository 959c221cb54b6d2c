"""The guard of a domain booted from a backup point: cleans up when ``virtnbdrestore`` dies by SIGKILL.

``virtnbdrestore -a instant|drill`` starts this as ``python -m virtnbd.restore.guard`` in its own
session, writes one JSON line (:class:`GuardPlan`) to its stdin, and ``done`` when it has cleaned up
itself (or the domain switched over). End of input without ``done`` means the command was killed:
its nbdkit died with it (``--exit-with-parent``), so the domain lost its disks' backing. The guard
then destroys the domain (and undefines it when it was defined) unless every disk already switched
over to its final image, removes the partial copies, the overlays and the sockets, and says so on
stderr. SIGTERM and SIGINT never reach here (those run the command's own cleanup).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import IO, Any

PROG = "virtnbdrestore"


@dataclass(frozen=True)
class GuardPlan:
    uri: str
    domain: str
    persistent: bool                                  # undefine after destroy
    remove: tuple[str, ...] = ()                      # partial final images: removed with the domain
    folders: tuple[str, ...] = field(default=())      # work folders (overlays, sockets): removed always


class Guard:
    """The running guard process, from the command's side."""

    def __init__(self, plan: GuardPlan) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        self.proc = subprocess.Popen([sys.executable, "-m", "virtnbd.restore.guard"], stdin=subprocess.PIPE,
                                     start_new_session=True, env=env)
        stdin: IO[bytes] | None = self.proc.stdin
        if stdin is None:
            raise RuntimeError("guard without stdin")
        self.stdin = stdin
        self.stdin.write(json.dumps(asdict(plan)).encode() + b"\n")
        self.stdin.flush()

    def done(self) -> None:
        """The command cleaned up (or switched over) itself: the guard leaves everything as it is."""
        with contextlib.suppress(OSError):
            self.stdin.write(b"done\n")
            self.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)


def _switched_over(dom: Any) -> bool:
    from virtnbd.restore.bootxml import nbd_sockets
    return not nbd_sockets(dom.XMLDesc(0))


def _stop_domain(plan: GuardPlan) -> str:
    import libvirt
    try:
        conn = libvirt.open(plan.uri)
    except libvirt.libvirtError as err:
        return f"cannot reach libvirt to stop domain {plan.domain}: {err.get_error_message()}"
    try:
        dom = conn.lookupByName(plan.domain)
    except libvirt.libvirtError:
        return f"domain {plan.domain} was not created"
    try:
        if dom.isActive() and _switched_over(dom):
            return f"domain {plan.domain} had switched over to its final images: left running"
        if dom.isActive():
            dom.destroy()
        if plan.persistent:
            dom.undefine()
    except libvirt.libvirtError as err:
        return f"domain {plan.domain}: {err.get_error_message()}"
    finally:
        conn.close()
    _remove(plan.remove)
    return f"domain {plan.domain} destroyed{' and undefined' if plan.persistent else ''}, partial copies removed"


def _remove(paths: Sequence[str]) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def main() -> int:
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    first = sys.stdin.readline()
    if not first:
        return 0
    raw = json.loads(first)
    plan = GuardPlan(str(raw["uri"]), str(raw["domain"]), bool(raw["persistent"]), tuple(raw["remove"]),
                     tuple(raw["folders"]))
    if "done" in sys.stdin.read().split():
        return 0
    what = _stop_domain(plan)
    for folder in plan.folders:
        shutil.rmtree(folder, ignore_errors=True)
    sys.stderr.write(f"{PROG}: killed before the switch-over: {what}; the backup set is unchanged\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
