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

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol, Self

from virtnbd import errors


class Target(Protocol):
    bytes_written: int
    name: str                 # final name (path, or rbd:pool/image) for messages

    def write(self, offset: int, data: bytes | memoryview) -> None: ...
    def zero(self, offset: int, length: int) -> None: ...
    def commit(self) -> None: ...
    def abort(self) -> None: ...
    def __enter__(self) -> Self: ...
    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None: ...


@dataclass(frozen=True)
class TargetRequest:
    spec: str                              # output file path, or "<scheme>:..." (e.g. rbd:pool/image)
    format: str                            # "qcow2" | "raw" (file targets)
    virtual_size: int
    preallocate: bool = False
    workers: int = 4
    image_info: Mapping[str, Any] = field(default_factory=dict)  # `qemu-img info` JSON saved at backup time
    extra: Mapping[str, Any] = field(default_factory=dict)       # scheme-specific options (ceph conf, ...)


Opener = Callable[[TargetRequest], Target]
_OPENERS: dict[str, Opener] = {}


def register(scheme: str, opener: Opener) -> None:
    """Make ``open_target`` send specs ``<scheme>:...`` to ``opener``."""
    _OPENERS[scheme] = opener


def scheme_of(spec: str) -> str | None:
    head, sep, _ = spec.partition(":")
    if sep and head.isalnum() and len(head) > 1 and "/" not in head:
        return head
    return None


def open_target(request: TargetRequest) -> Target:
    scheme = scheme_of(request.spec)
    if scheme is not None:
        if scheme == "rbd" and scheme not in _OPENERS:  # built in, imported only when used (needs python3-rbd)
            from virtnbd.restore.targets.rbd import open_rbd
            register("rbd", open_rbd)
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


class TargetBase:
    """Shared context-manager behaviour: abort on exception, never commit implicitly."""

    bytes_written = 0
    name = ""

    def commit(self) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        if et is not None:
            self.abort()
