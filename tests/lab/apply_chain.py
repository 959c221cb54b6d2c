"""Independent check of a backup set: apply a chain's frames, in order, to a raw file.

Deliberately simple (no restore planning): start from an all-zero file of the
point's virtual size, then for every point of the resolved chain, root first,
write each data frame and zero each zero frame. The result must equal the
shadow image of that point. virtnbd.restore has its own engine; this is the
reference it is compared against.
"""
from __future__ import annotations

import os
from pathlib import Path

from virtnbd.backupset import chain, manifest
from virtnbd.stream import open_stream


def apply_chain(folder: str | os.PathLike[str], disk: str, until: str | None, out: str | os.PathLike[str]) -> Path:
    m = manifest.load(folder)
    if m is None:
        raise FileNotFoundError(f"{folder}: no manifest")
    points = chain.resolve(m, until)
    entries = [p.disks[disk] for p in points if disk in p.disks]
    size = entries[-1].virtual_size
    target = Path(out)
    with target.open("wb") as f:
        f.truncate(size)
        for entry in entries:
            with open_stream(os.path.join(folder, entry.file)) as reader:
                for ref, data in reader.iter_frames():
                    if ref.offset + ref.length > size:
                        continue
                    f.seek(ref.offset)
                    f.write(data if ref.kind == "data" and data is not None else bytes(ref.length))
    return target
