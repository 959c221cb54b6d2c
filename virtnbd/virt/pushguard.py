"""Guard of a push-mode backup job: ``python -m virtnbd.virt.pushguard URI UUID TARGET...``.

Started by :class:`virtnbd.virt.pushjob.PushJob` in its own session with a pipe on stdin. It reads
until end of file: "done" means the backup process ended the job itself; end of file without it
means that process died (SIGKILL, OOM), and the guard aborts the domain's backup job if it is
still the push job writing exactly TARGET... (never anybody else's job).
"""
from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Sequence

import libvirt

from virtnbd.virt import xmlbuild
from virtnbd.virt.job import running_job_xml, wait_gone

log = logging.getLogger("virtnbd.pushguard")


def _abort_if_ours(uri: str, uuid: str, targets: Sequence[str]) -> str:
    conn = libvirt.open(uri)
    try:
        dom = conn.lookupByUUIDString(uuid)
        xml = running_job_xml(dom)
        if xml is None:
            return "no job running"
        if sorted(xmlbuild.push_targets(xml)) != sorted(targets):
            return "the running job is not the guarded one"
        dom.abortJob()
        wait_gone(dom)
        return "job aborted"
    finally:
        conn.close()


def main(argv: Sequence[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)      # the backup process handles Ctrl-C itself
    if len(argv) < 3:
        sys.stderr.write("usage: python -m virtnbd.virt.pushguard URI UUID TARGET...\n")
        return 2
    uri, uuid, targets = argv[0], argv[1], list(argv[2:])
    said = sys.stdin.buffer.read()
    if said.strip() == b"done":
        return 0
    try:
        outcome = _abort_if_ours(uri, uuid, targets)
    except libvirt.libvirtError as err:
        sys.stderr.write(f"virtnbd push guard: cannot abort the backup job: {err}\n")
        return 1
    sys.stderr.write(f"virtnbd push guard: backup process gone: {outcome}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
