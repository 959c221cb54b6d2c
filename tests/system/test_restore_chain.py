"""A real domain, random writes, full + 10 incs + a diff: virtnbdrestore at every point is
byte-identical to the shadow image at that point, in qcow2 and raw; a restore writes no more
than the final image's data, whatever the chain length; restored images are as thin as the source."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.lab.libvirt_lab import DiskSpec, MiB, compare_images, random_writes
from tests.system.backup_helpers import REPO, ok
from virtnbd.restore.options import RestoreOptions
from virtnbd.restore.run import make_selection, restore

pytestmark = pytest.mark.system

SIZE = 32 * MiB
INCS = 10


def _cli_restore(folder, out, *extra):  # type: ignore[no-untyped-def]
    cmd = [sys.executable, str(REPO / "virtnbdrestore"), "-n", "-i", str(folder), "-o", str(out), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)


def _allocated_data(image) -> int:  # type: ignore[no-untyped-def]
    """Bytes `qemu-img map` reports as data (not zero) in the domain's image."""
    out = subprocess.run(["qemu-img", "map", "-U", "--output=json", str(image)], capture_output=True, text=True,
                         check=True).stdout
    return sum(e["length"] for e in json.loads(out) if e["data"] and not e.get("zero", False))


def test_every_point_of_a_real_chain_restores_exactly(make_domain, tmp_path) -> None:  # type: ignore[no-untyped-def]
    dom = make_domain(disks=[DiskSpec("sda", "sata", "qcow2", SIZE)])
    disk = dom.disk("sda")
    folder = dom.dir / "backup"
    disk.apply_all(random_writes(seed=1, n=40, size=SIZE))
    expected = {ok(dom, "full", folder)["point"]: disk.snapshot("p0")}
    for step in range(1, INCS + 1):
        disk.apply_all(random_writes(seed=100 + step, n=10, size=SIZE))
        expected[ok(dom, "inc", folder)["point"]] = disk.snapshot(f"p{step}")
    disk.apply_all(random_writes(seed=999, n=10, size=SIZE))
    diff_point = ok(dom, "diff", folder)["point"]
    expected[diff_point] = disk.snapshot("pdiff")
    assert len(expected) == INCS + 2 and diff_point.startswith("diff.")

    for point, shadow in expected.items():
        for fmt in ("qcow2", "raw"):
            out = tmp_path / f"{point}-{fmt}"
            res = _cli_restore(folder, out, "--until", point, "--format", fmt)
            assert res.returncode == 0, res.stderr
            compare_images(out / f"sda.{fmt}", shadow, fmt=fmt)
            (out / f"sda.{fmt}").unlink()

    # the newest point (the diff) holds the domain's current content: bytes written <= the data
    # in that image, and the restored image is about as thin as the source
    dom.stop()
    source_data = _allocated_data(disk.image)
    for fmt in ("qcow2", "raw"):
        opts = RestoreOptions(input=str(folder), output=str(tmp_path / f"newest-{fmt}"), format=fmt, noprogress=True)
        [res] = restore(make_selection(opts), opts)
        assert res.point == diff_point and res.chain_length == INCS + 2
        assert res.bytes_written <= source_data, (fmt, res.bytes_written, source_data)
        compare_images(res.target, expected[diff_point], fmt=fmt)
    # The live image keeps clusters QEMU allocated and later zeroed/discarded, so it is compared
    # as a thin copy of it (qemu-img convert, what any copy tool allocates) and as it is (upper bound).
    thin_copy = tmp_path / "source-copy.qcow2"
    subprocess.run(["qemu-img", "convert", "-U", "-O", "qcow2", str(disk.image), str(thin_copy)], check=True)
    src_alloc = os.stat(thin_copy).st_blocks * 512
    got = os.stat(tmp_path / "newest-qcow2" / "sda.qcow2").st_blocks * 512
    assert abs(got - src_alloc) <= 0.10 * src_alloc, (got, src_alloc)
    assert got <= 1.10 * os.stat(disk.image).st_blocks * 512
    raw_got = os.stat(tmp_path / "newest-raw" / "sda.raw").st_blocks * 512
    assert abs(raw_got - source_data) <= 0.10 * source_data, (raw_got, source_data)
