"""What every restore target is (Target, TargetBase) and is asked for (TargetRequest).

Kept apart from ``targets/__init__.py`` (which picks a target and imports the
implementations) so the implementations import this and never their package.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol, Self


class Target(Protocol):
    bytes_written: int
    name: str                 # final name (path, or rbd:pool/image) for messages

    def write(self, offset: int, data: bytes | memoryview) -> None: ...
    def write_many(self, pieces: list[tuple[int, memoryview]]) -> int: ...
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


def scheme_of(spec: str) -> str | None:
    head, sep, _ = spec.partition(":")
    if sep and head.isalnum() and len(head) > 1 and "/" not in head:
        return head
    return None


class TargetBase:
    """Shared context-manager behaviour: abort on exception, never commit implicitly."""

    bytes_written = 0
    name = ""

    def write(self, offset: int, data: bytes | memoryview) -> None:
        raise NotImplementedError

    def write_many(self, pieces: list[tuple[int, memoryview]]) -> int:
        """Several ``(offset, data)`` writes (one batch of a restore); the bytes written."""
        for offset, data in pieces:
            self.write(offset, data)
        return sum(len(data) for _, data in pieces)

    def commit(self) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        if et is not None:
            self.abort()
