"""Persistent dirty bitmaps of qcow2 images, read and changed with ``qemu-img`` (domain shut off).

While a domain runs, QEMU owns its images: bitmaps created in that session
are not in the image header yet, so these helpers are only trusted on images
of a domain that is not running (``qemu-img info -U`` is used for reading
anyway, so a read never waits for a lock).
"""
from __future__ import annotations

import json
import logging
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from virtnbd import errors
from virtnbd.remote import host

log = logging.getLogger(__name__)

QEMU_IMG = "qemu-img"
TIMEOUT = 120
LOCK_HINT = "lock"          # qemu-img: Could not open 'X': Failed to get "write" lock


@dataclass(frozen=True)
class Bitmap:
    name: str
    flags: tuple[str, ...]          # "auto" (enabled), "in-use", "inconsistent"
    granularity: int

    @property
    def broken(self) -> bool:
        """Unusable after QEMU died with the image open, or marked inconsistent."""
        return "inconsistent" in self.flags or "in-use" in self.flags


def _qemu_img(args: Sequence[str], what: str) -> str:
    cmd = [QEMU_IMG, *args]
    try:
        proc = host.current().run(cmd, timeout=TIMEOUT)       # the disks' host: this one or a remote
    except (OSError, subprocess.SubprocessError, errors.RemoteError) as err:
        raise errors.LibvirtError(reason=f"{what}: {' '.join(cmd)}: {err}") from err
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise errors.LibvirtError(reason=f"{what}: {_explain(detail, proc.returncode)}")
    return proc.stdout


def _explain(detail: Sequence[str], returncode: int) -> str:
    """qemu-img's last line; a lock conflict also says who may hold the image and what to do."""
    locked = next((line for line in detail if LOCK_HINT in line), None)
    if locked is not None:
        return (f"the image is in use by another process ({locked.split(': ')[-1].strip()}): stop the "
                f"qemu-nbd, qemu-io, guestmount or VM that holds it and run again")
    return detail[-1] if detail else f"exit {returncode}"


def image_info(path: str) -> Mapping[str, object]:
    out = _qemu_img(["info", "-U", "--output=json", path], f"cannot read image {path}")
    try:
        info = json.loads(out)
    except json.JSONDecodeError as err:
        raise errors.LibvirtError(reason=f"qemu-img info {path}: not JSON: {err}") from err
    if not isinstance(info, dict):
        raise errors.LibvirtError(reason=f"qemu-img info {path}: unexpected output")
    return info


def parse_bitmaps(info: Mapping[str, object]) -> dict[str, Bitmap]:
    """Bitmaps of a ``qemu-img info --output=json`` record, by name."""
    spec = info.get("format-specific")
    data = spec.get("data") if isinstance(spec, dict) else None
    raw = data.get("bitmaps") if isinstance(data, dict) else None
    found: dict[str, Bitmap] = {}
    for item in raw or []:
        if isinstance(item, dict) and isinstance(item.get("name"), str):
            found[item["name"]] = Bitmap(item["name"], tuple(item.get("flags") or ()),
                                         int(item.get("granularity") or 0))
    return found


def list_bitmaps(path: str) -> dict[str, Bitmap]:
    return parse_bitmaps(image_info(path))


def virtual_size(path: str) -> int:
    return int(image_info(path).get("virtual-size") or 0)  # type: ignore[call-overload]


def add(path: str, name: str) -> None:
    """Add an enabled persistent bitmap (it records every later write)."""
    _qemu_img(["bitmap", "--add", path, name], f"cannot add bitmap {name} to {path}")
    log.debug("added bitmap %s to %s", name, path)


def remove(path: str, name: str) -> None:
    _qemu_img(["bitmap", "--remove", path, name], f"cannot remove bitmap {name} from {path}")
    log.debug("removed bitmap %s from %s", name, path)


def add_merged(path: str, name: str, source: str) -> None:
    """Add enabled bitmap ``name`` holding every change ``source`` recorded (one qemu-img call)."""
    _qemu_img(["bitmap", "--add", "--merge", source, path, name], f"cannot add bitmap {name} to {path}")
    log.debug("added bitmap %s (from %s) to %s", name, source, path)
