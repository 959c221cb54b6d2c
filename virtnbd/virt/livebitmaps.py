"""Renaming a dirty bitmap in a RUNNING domain's QEMU (libvirt has no call for it).

An online full whose previous chain's checkpoints still exist cannot create
``virtnbdbackup.0`` at job start (the old chain holds that name). It creates
``virtnbdbackup.pending`` instead and, once its point is committed and the old
chain deleted, renames the pending bitmap on every node that carries it: one
QMP transaction adds a persistent ``virtnbdbackup.0``, merges the pending
bitmap into it and removes the pending one, so no write is missed between the
steps. libvirt marks the domain "tainted: custom-monitor" in its QEMU log.
"""
from __future__ import annotations

import json
import logging
from typing import Any

import libvirt
import libvirt_qemu

from virtnbd import errors
from virtnbd.virt.connection import reason

log = logging.getLogger(__name__)


def _qmp(dom: libvirt.virDomain, command: str, arguments: dict[str, Any]) -> Any:
    text = json.dumps({"execute": command, "arguments": arguments})
    try:
        answer = json.loads(libvirt_qemu.qemuMonitorCommand(dom, text, 0))
    except libvirt.libvirtError as err:
        raise errors.LibvirtError(reason=f"QEMU monitor command {command} failed: {reason(err)}") from err
    if "error" in answer:
        desc = answer["error"].get("desc", answer["error"])
        raise errors.LibvirtError(reason=f"QEMU monitor command {command} failed: {desc}")
    return answer.get("return")


def nodes_with(dom: libvirt.virDomain, bitmap: str) -> list[str]:
    """Block nodes of the domain's QEMU that carry ``bitmap``."""
    nodes = _qmp(dom, "query-named-block-nodes", {"flat": True}) or []
    return [n["node-name"] for n in nodes if any(b.get("name") == bitmap for b in n.get("dirty-bitmaps", []))]


def rename(dom: libvirt.virDomain, old: str, new: str) -> list[str]:
    """Rename bitmap ``old`` to ``new`` (persistent, recording) on every node; returns those nodes."""
    nodes = nodes_with(dom, old)
    actions: list[dict[str, Any]] = []
    for node in nodes:
        actions += [
            {"type": "block-dirty-bitmap-add", "data": {"node": node, "name": new, "persistent": True}},
            {"type": "block-dirty-bitmap-merge", "data": {"node": node, "target": new, "bitmaps": [old]}},
            {"type": "block-dirty-bitmap-remove", "data": {"node": node, "name": old}},
        ]
    if actions:
        _qmp(dom, "transaction", {"actions": actions})
        log.debug("renamed bitmap %s to %s on %s", old, new, ", ".join(nodes))
    return nodes
