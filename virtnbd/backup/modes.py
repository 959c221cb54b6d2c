"""File modes of a backup folder: private (0600 files, 0700 folders) unless ``--umask`` says otherwise.

A run sets the process umask (default 077) so every file and folder it creates
is private from the first byte. With ``--umask`` the run uses that umask and,
at the end, gives the folder's files ``0666 & ~umask`` and its folders
``0777 & ~umask`` (files written with an explicit private mode included).
"""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from virtnbd import fsutil

log = logging.getLogger(__name__)

DEFAULT_UMASK = 0o077


@contextlib.contextmanager
def umask(value: int | None) -> Iterator[int]:
    """Process umask for the run (restored afterwards)."""
    effective = DEFAULT_UMASK if value is None else value
    old = os.umask(effective)
    try:
        yield effective
    finally:
        os.umask(old)


def apply(folder: Path, value: int | None) -> None:
    """With an explicit umask, set the modes it implies on everything in the folder."""
    fsutil.apply_modes(folder, value)
