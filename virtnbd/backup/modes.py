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
    if value is None or not folder.is_dir():
        return
    file_mode, dir_mode = 0o666 & ~value, 0o777 & ~value
    with contextlib.suppress(OSError):
        os.chmod(folder, dir_mode)
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            with contextlib.suppress(OSError):
                os.chmod(os.path.join(root, name), dir_mode)
        for name in files:
            with contextlib.suppress(OSError):
                os.chmod(os.path.join(root, name), file_mode)
