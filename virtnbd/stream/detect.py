"""Open a stream of either format: virtnbd streams (reader.py) or virtnbdbackup sparse streams (legacy.py).

The one place that knows both readers, so neither imports the other's module.
"""
from __future__ import annotations

import os
from typing import BinaryIO

from virtnbd import errors
from virtnbd.stream import codec, legacy
from virtnbd.stream import format as fmt
from virtnbd.stream.reader import StreamReader

LEGACY_PROBE = 64


def open_stream(source: str | os.PathLike[str] | BinaryIO, path: str | None = None,
                stages: tuple[codec.Stage, ...] = (), owns: bool = False) -> StreamReader:
    """Open a stream file (or an already open binary file / pipe).

    ``stages``: codec stages beyond checksum and compression (given by the set that owns their keys).
    ``owns``: an open file given as ``source`` is closed with the reader (and on failure).

    Detects virtnbdbackup sparse streams and returns a
    :class:`virtnbd.stream.legacy.LegacyStreamReader` for them (same interface).
    """
    if isinstance(source, str | os.PathLike):
        name = os.fspath(source)
        try:
            f: BinaryIO = open(name, "rb")  # noqa: SIM115 - the reader owns and closes it
        except OSError as err:
            raise errors.FormatError(path=name, offset=0, reason=err.strerror or str(err)) from err
        owns = True
    else:
        f, name = source, str(path or getattr(source, "name", "<stream>"))
    try:
        probe = _peek(f, name)
        if probe.startswith(fmt.MAGIC) or (0 < len(probe) < len(fmt.MAGIC) and fmt.MAGIC.startswith(probe)):
            # (a pipe may show only a few bytes ahead: the reader checks the full magic)
            return StreamReader(f, name, owns=owns, stages=stages)
        if legacy.detect(probe):
            return legacy.LegacyStreamReader(f, name, owns=owns)
        raise errors.FormatError(path=name, offset=0, reason="not a virtnbd or virtnbdbackup stream")
    except BaseException:
        if owns:
            f.close()
        raise


def _peek(f: BinaryIO, path: str) -> bytes:
    """The first bytes of the stream: from position 0 of a seekable file, else peeked from a pipe."""
    peek = getattr(f, "peek", None)
    try:
        if f.seekable():
            f.seek(0)
            data = f.read(LEGACY_PROBE)
            f.seek(0)
            return data
        if peek is not None:
            return bytes(peek(LEGACY_PROBE)[:LEGACY_PROBE])
    except OSError as err:
        raise errors.FormatError(path=path, offset=0, reason=err.strerror or str(err)) from err
    raise errors.UsageError(reason=f"{path}: cannot detect the stream type of an unbuffered pipe")
