"""``virtnbdbackup -o -`` and ``virtnbdrestore -i -``: a backup set as one stream on a pipe.

The container is a POSIX tar (pax) stream of one backup-set folder
(docs/FORMAT.md, "Single-stream container"): the backup is written into a
private scratch folder, checked as usual, then streamed to stdout and the
folder removed; the reader unpacks the stream into a private scratch folder
(regular files and folders only, no absolute or ``..`` names) and restores
from there. Both sides need scratch space for one set.
"""
from __future__ import annotations

import contextlib
import shutil
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from virtnbd import errors

CONTAINER_ROOT = "virtnbd-set"


@contextlib.contextmanager
def scratch_set(scratchdir: str) -> Iterator[Path]:
    """A private (0700) folder for one set; removed at exit."""
    try:
        path = Path(tempfile.mkdtemp(prefix="virtnbd-stdio.", dir=scratchdir))
    except OSError as err:
        raise errors.StorageError(path=scratchdir, reason=err.strerror or str(err)) from err
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def write_container(folder: Path, out: BinaryIO | None = None) -> None:
    """Stream ``folder`` as the tar container to ``out`` (default: stdout)."""
    stream = out if out is not None else sys.stdout.buffer
    names = sorted(p for p in folder.rglob("*") if p.name != ".virtnbdbackup.lock")
    with tarfile.open(fileobj=stream, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for path in names:
            tar.add(path, arcname=f"{CONTAINER_ROOT}/{path.relative_to(folder)}", recursive=False)
    stream.flush()


def read_container(into: Path, stream: BinaryIO | None = None) -> Path:
    """Unpack a container from ``stream`` (default: stdin) into ``into``; the set's folder."""
    source = stream if stream is not None else sys.stdin.buffer
    try:
        with tarfile.open(fileobj=source, mode="r|*") as tar:
            for member in tar:
                _check_member(member)
                tar.extract(member, into, set_attrs=False)
    except tarfile.TarError as err:
        raise errors.BackupSetError(path="-", reason=f"standard input is not a virtnbd container: {err}") from err
    folder = into / CONTAINER_ROOT
    if not folder.is_dir():
        raise errors.BackupSetError(path="-", reason=f"container has no {CONTAINER_ROOT}/ folder")
    return folder


def _check_member(member: tarfile.TarInfo) -> None:
    parts = Path(member.name).parts
    bad = (member.name.startswith("/") or ".." in parts or not parts or parts[0] != CONTAINER_ROOT
           or not (member.isfile() or member.isdir()))
    if bad:
        raise errors.BackupSetError(path="-", reason=f"container member {member.name!r} refused "
                                                     "(only files and folders under virtnbd-set/)")


def send_file(path: Path, out: BinaryIO | None = None) -> None:
    """Copy a restored raw image to ``out`` (default: stdout), holes read as zeroes."""
    stream = out if out is not None else sys.stdout.buffer
    with open(path, "rb") as f:
        shutil.copyfileobj(f, stream, 4 << 20)
    stream.flush()
