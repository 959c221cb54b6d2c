"""Comparing images and byte strings against the expected bytes, with a useful report."""
from __future__ import annotations

import json
import uuid
from pathlib import Path

from tests.lab.common import LabError, run
from tests.lab.diskops import ALIGN


class ImageMismatch(AssertionError):
    """An image's bytes differ from the expected (shadow) image."""


def image_format(path: Path | str) -> str:
    info = json.loads(run(["qemu-img", "info", "-U", "--output=json", str(path)]).stdout)
    return str(info["format"])


def virtual_size(path: Path | str, fmt: str | None = None) -> int:
    cmd = ["qemu-img", "info", "-U", "--output=json"] + (["-f", fmt] if fmt else []) + [str(path)]
    return int(json.loads(run(cmd).stdout)["virtual-size"])


def compare_images(image: Path | str, expected: Path | str, fmt: str | None = None, expected_fmt: str = "raw") -> None:
    """Raise :class:`ImageMismatch` (with the differing 64 KiB blocks) unless the bytes are identical."""
    fmt = fmt or image_format(image)
    size_a, size_b = virtual_size(image, fmt), virtual_size(expected, expected_fmt)
    if size_a != size_b:
        raise ImageMismatch(f"{image}: virtual size {size_a} != expected {size_b} ({expected})")
    cmd = ["qemu-img", "compare", "-U", "-q", "-f", fmt, "-F", expected_fmt, str(image), str(expected)]
    proc = run(cmd, check=False)
    if proc.returncode == 0:
        return
    if proc.returncode != 1:
        raise LabError(f"qemu-img compare {image} {expected}: {proc.stderr.strip()}")
    raise ImageMismatch(f"{image} differs from {expected}: {describe_mismatch(image, fmt, expected, expected_fmt)}")


def _read_raw(path: Path | str, fmt: str) -> bytes:
    if fmt == "raw":
        return Path(path).read_bytes()
    tmp = Path(str(path) + f".{uuid.uuid4().hex[:6]}.cmp.raw")
    try:
        run(["qemu-img", "convert", "-U", "-f", fmt, "-O", "raw", str(path), str(tmp)])
        return tmp.read_bytes()
    finally:
        tmp.unlink(missing_ok=True)


def describe_mismatch(image: Path | str, fmt: str, expected: Path | str, expected_fmt: str = "raw") -> str:
    a, b = _read_raw(image, fmt), _read_raw(expected, expected_fmt)
    return describe_bytes_mismatch(a, b)


def describe_bytes_mismatch(got: bytes, want: bytes, block: int = ALIGN, limit: int = 8) -> str:
    if len(got) != len(want):
        return f"length {len(got)} != expected {len(want)}"
    bad = [off for off in range(0, len(got), block) if got[off : off + block] != want[off : off + block]]
    if not bad:
        return "identical"
    first = bad[0]
    i = next(i for i in range(first, min(first + block, len(got))) if got[i] != want[i])
    shown = ", ".join(f"{o:#x}" for o in bad[:limit]) + (" ..." if len(bad) > limit else "")
    return (
        f"{len(bad)} of {len(got) // block} blocks of {block} differ ({shown}); "
        f"first byte at {i:#x}: got {got[i]:#04x}, expected {want[i]:#04x}"
    )


def assert_bytes_equal(got: bytes, want: bytes, what: str = "data") -> None:
    if got != want:
        raise ImageMismatch(f"{what}: {describe_bytes_mismatch(got, want)}")
