"""Reader for virtnbdbackup (abbbi/virtnbdbackup) sparse streams (spec: docs/LEGACY_FORMAT.md)."""
from __future__ import annotations

from virtnbd.stream.reader import StreamReader


def detect(probe: bytes) -> bool:
    """True when ``probe`` (the first bytes of a file) starts a virtnbdbackup stream."""
    return False


class LegacyStreamReader(StreamReader):  # filled in with the legacy reader (issue 3, step 4)
    pass
