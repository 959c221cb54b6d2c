"""The one place that decides which ``scheme://`` locations a command accepts.

A value such as ``s3://bucket/x`` must never silently become a local folder
named ``s3:``. Commands ask :func:`check` for every location option; stores
that add a scheme (object storage, remote hosts) register it here.
"""
from __future__ import annotations

import re

from virtnbd import errors

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_SUPPORTED: dict[str, set[str]] = {"backup-output": {"s3"}, "restore-input": {"s3"}, "restore-output": set(),
                                   "prune-input": {"s3"}, "map-input": {"s3"}}


def register(role: str, scheme: str) -> None:
    """Let ``role`` (backup-output, restore-input, restore-output) accept ``scheme://``."""
    _SUPPORTED.setdefault(role, set()).add(scheme)


def scheme(value: str) -> str | None:
    match = _URL.match(value)
    return match.group(1).lower() if match else None


def check(value: str, role: str, option: str) -> str:
    """``value`` unchanged, or a UsageError when it names a scheme ``role`` does not support."""
    found = scheme(value)
    if found is not None and found not in _SUPPORTED.get(role, set()):
        known = ", ".join(f"{s}://" for s in sorted(_SUPPORTED.get(role, set()))) or "none"
        raise errors.UsageError(reason=f"{option} {value}: unsupported scheme '{found}://' "
                                       f"(supported here: {known}; a local path needs no scheme)")
    return value
