"""Where restored bytes go: a file (raw, qcow2) or another store (rbd: added by the Ceph code).

``open_target(request)`` picks an opener by the spec's scheme. Openers are
registered with :func:`register`; a plain path has no scheme and goes to the
file opener for the requested format. Every target:

- is a context manager (leaving with an exception calls ``abort``);
- accepts ``write``/``zero`` from several threads at once (the apply engine
  keeps ``workers`` requests in flight);
- writes under a temporary name and renames in ``commit`` only, so no
  complete-looking output exists before the last byte is flushed;
- counts ``bytes_written`` (data bytes actually sent to the store).
"""
from __future__ import annotations

import os
from collections.abc import Callable

from virtnbd import errors
from virtnbd.restore.targets.base import Target, TargetBase, TargetRequest, scheme_of

__all__ = ["Opener", "Target", "TargetBase", "TargetRequest", "host_path", "open_target", "register", "scheme_of"]


Opener = Callable[[TargetRequest], Target]
_OPENERS: dict[str, Opener] = {}


def register(scheme: str, opener: Opener) -> None:
    """Make ``open_target`` send specs ``<scheme>:...`` to ``opener``."""
    _OPENERS[scheme] = opener


def open_target(request: TargetRequest) -> Target:
    scheme = scheme_of(request.spec)
    if scheme is not None:
        if scheme == "rbd" and scheme not in _OPENERS:  # built in, imported only when used (needs python3-rbd)
            from virtnbd.restore.targets.rbd import open_rbd
            register("rbd", open_rbd)
        if scheme == "remote" and scheme not in _OPENERS:   # another host (ssh + remote qemu-nbd)
            from virtnbd.restore.targets.remote import open_remote
            register("remote", open_remote)
        opener = _OPENERS.get(scheme)
        if opener is None:
            raise errors.UsageError(reason=f"{request.spec}: unknown target type '{scheme}:'")
        return opener(request)
    if request.format == "raw":
        from virtnbd.restore.targets.raw import RawTarget
        return RawTarget(request)
    if request.format == "qcow2":
        from virtnbd.restore.targets import qcow2direct
        image = qcow2direct.settings(request.image_info, request.preallocate)
        if image is not None and not request.extra.get("qcow2_via_qemu_nbd"):
            return qcow2direct.Qcow2DirectTarget(request, image)
        from virtnbd.restore.targets.qcow2 import Qcow2Target
        return Qcow2Target(request)
    raise errors.UsageError(reason=f"unknown output format {request.format!r} (qcow2 or raw)")


def host_path(spec: str) -> str | None:
    """The file path a restored disk has on the host that runs it (domain XML ``<source file>``).

    A local file: its absolute path; ``remote:PATH``: PATH (on that host); other stores: None."""
    scheme = scheme_of(spec)
    if scheme is None:
        return os.path.abspath(spec)
    if scheme == "remote":
        return spec.partition(":")[2]
    return None
