"""virtnbdrestore against synthetic backup sets, proven by bytes with qemu-img compare (real qemu-nbd)."""
from __future__ import annotations

import json
import os
import subprocess

import pytest
from lxml import etree

from tests.functional.restore_sets import SetBuilder, compare
from virtnbd.cli.restore import main
from virtnbd.restore.options import RestoreOptions
from virtnbd.restore.run import make_selection, restore


def _chain(folder: str, incs: int = 10, diff: bool = True, **kw) -> SetBuilder:
    b = SetBuilder(folder, **kw)
    b.scribble(60)
    b.full()
    for _ in range(incs):
        b.scribble(12)
        b.inc()
    if diff:
        b.scribble(10)
        b.diff()
    return b


@pytest.fixture(scope="module")
def chain_set(tmp_path_factory):
    return _chain(str(tmp_path_factory.mktemp("set") / "backup"), compression="lz4")


def _restore(folder: str, out: str, *extra: str) -> int:
    return main(["-i", folder, "-o", out, "-n", *extra])


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_every_point_is_byte_identical(chain_set, tmp_path, fmt):
    for point in chain_set.points:
        out = str(tmp_path / point)
        assert _restore(chain_set.folder, out, "--until", point, "--format", fmt) == 0
        image = os.path.join(out, f"sda.{fmt}")
        compare(image, fmt, chain_set.shadow_path(point))
        info = json.loads(subprocess.check_output(["qemu-img", "info", "--output=json", image]))
        assert info["virtual-size"] == chain_set.size
        assert info["format"] == fmt
        assert sorted(os.listdir(out)) == [f"sda.{fmt}"]


def _engine(folder: str, out: str, fmt: str = "qcow2", **kw) -> list:
    opts = RestoreOptions(input=folder, output=out, format=fmt, noprogress=True, **kw)
    return restore(make_selection(opts), opts)


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_bytes_written_bounded_by_final_data_and_not_by_chain_length(tmp_path, fmt):
    long_set = SetBuilder(str(tmp_path / "long"), seed=7)
    long_set.scribble(80)
    long_set.full()
    for _ in range(20):
        long_set.scribble(15)
        long_set.inc()
    short = SetBuilder(str(tmp_path / "short"), seed=8)
    short.shadow[:] = long_set.shadow
    short.allocated = set(long_set.allocated)
    short.full()
    short.inc()  # empty inc: same final content
    [r_long] = _engine(long_set.folder, str(tmp_path / "out-long"), fmt)
    [r_short] = _engine(short.folder, str(tmp_path / "out-short"), fmt)
    data_in_final = sum(1 for c in long_set.allocated
                        if any(long_set.shadow[c * long_set.cluster:(c + 1) * long_set.cluster])) * long_set.cluster
    assert r_long.bytes_written <= data_in_final
    assert r_long.bytes_written == r_short.bytes_written
    assert r_long.chain_length == 21
    compare(r_long.target, fmt, long_set.shadow_path(long_set.points[-1]))


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_restored_image_is_thin(tmp_path, fmt):
    b = SetBuilder(str(tmp_path / "set"), size=32 << 20)
    b.scribble(40, zero_share=0)
    b.full()
    b.scribble(20)
    b.inc()
    [res] = _engine(b.folder, str(tmp_path / "out"), fmt)
    source = str(tmp_path / "source.qcow2")
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", "-f", "raw", b.shadow_path(b.points[-1]), source], check=True)
    src_alloc = os.stat(source).st_blocks * 512
    got = os.stat(res.target).st_blocks * 512
    assert abs(got - src_alloc) <= 0.10 * src_alloc, (got, src_alloc)
    assert got < b.size / 2


def _info(cluster: int, compat: str = "1.1", lazy: bool = False, compression: str = "zlib", **more) -> dict:
    data = {"compat": compat, "lazy-refcounts": lazy, "refcount-bits": 16, "compression-type": compression, **more}
    return {"format": "qcow2", "cluster-size": cluster, "format-specific": {"type": "qcow2", "data": data}}


QCOW2_VARIANTS = {
    "zstd-lazy-16k": (_info(16384, lazy=True, compression="zstd"), "qcow2direct"),
    "compat-0.10": (_info(65536, compat="0.10"), "qcow2direct"),
    "512b-clusters": (_info(512), "qcow2direct"),          # many L2 tables and refcount blocks
    "2m-clusters": (_info(2 << 20), "qcow2direct"),
    "extended-l2": (_info(65536, **{"extended-l2": True}), "qemu-nbd"),
    "refcount-bits-8": ({**_info(65536), "format-specific": {"type": "qcow2", "data": {"compat": "1.1",
                                                                                     "refcount-bits": 8}}},
                        "qemu-nbd"),
}


@pytest.mark.parametrize("variant", list(QCOW2_VARIANTS))
def test_qcow2_created_with_backup_time_options(tmp_path, variant):
    info, route = QCOW2_VARIANTS[variant]
    b = _chain(str(tmp_path / "set"), incs=2, diff=False, image_info=info, size=(8 << 20) + 4096 * 3)
    [res] = _engine(b.folder, str(tmp_path / "out"))
    got = json.loads(subprocess.check_output(["qemu-img", "info", "--output=json", res.target]))
    want = info["format-specific"]["data"]
    assert got["cluster-size"] == info["cluster-size"]
    data = got["format-specific"]["data"]
    assert data["compat"] == want["compat"]
    for key in ("lazy-refcounts", "compression-type", "extended-l2", "refcount-bits"):
        if key in want and key in data:
            assert data[key] == want[key], key
    assert got["virtual-size"] == b.size
    compare(res.target, "qcow2", b.shadow_path(b.points[-1]))  # also runs qemu-img check
    from virtnbd.restore.targets import qcow2direct
    assert (qcow2direct.settings(info, False) is not None) == (route == "qcow2direct")


def test_qcow2_through_qemu_nbd_and_preallocated(tmp_path):
    b = _chain(str(tmp_path / "set"), incs=2, diff=False)
    [res] = _engine(b.folder, str(tmp_path / "out"), preallocate=True)
    compare(res.target, "qcow2", b.shadow_path(b.points[-1]))
    got = json.loads(subprocess.check_output(["qemu-img", "info", "--output=json", res.target]))
    assert got["format"] == "qcow2"


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_resize_mid_chain_uses_size_of_restored_point(tmp_path, fmt):
    b = SetBuilder(str(tmp_path / "set"), size=8 << 20)
    b.scribble(60, zero_share=0)
    b.full()
    b.resize(4 << 20)
    b.scribble(5)
    b.inc()
    b.resize(12 << 20)  # grown again: the old tail must not come back
    b.scribble(5)
    b.inc()
    for point, size in zip(b.points, (8 << 20, 4 << 20, 12 << 20), strict=True):
        opts_out = str(tmp_path / f"out-{point}")
        [res] = _engine(b.folder, opts_out, fmt, until=point)
        assert res.virtual_size == size
        compare(res.target, fmt, b.shadow_path(point))


def test_preallocate_raw(tmp_path):
    b = _chain(str(tmp_path / "set"), incs=2, diff=False)
    [res] = _engine(b.folder, str(tmp_path / "out"), "raw", preallocate=True)
    assert os.stat(res.target).st_blocks * 512 >= b.size
    compare(res.target, "raw", b.shadow_path(b.points[-1]))


def test_sequence_restores_and_checks_links(tmp_path, capsys):
    b = _chain(str(tmp_path / "set"), incs=3, diff=False)
    files = ["sda.full.data", "sda.inc.virtnbdbackup.1.data", "sda.inc.virtnbdbackup.2.data"]
    out = str(tmp_path / "out")
    assert _restore(b.folder, out, "--sequence", ",".join(files), "--format", "raw") == 0
    compare(os.path.join(out, "sda.raw"), "raw", b.shadow_path("virtnbdbackup.2"))
    broken = ["sda.full.data", "sda.inc.virtnbdbackup.2.data"]
    assert _restore(b.folder, str(tmp_path / "out2"), "--sequence", ",".join(broken)) == 1
    err = capsys.readouterr().err
    assert "sda.inc.virtnbdbackup.2.data" in err and "chain broken" in err
    assert not os.path.exists(str(tmp_path / "out2" / "sda.qcow2"))


def test_dump_table_and_json(chain_set, capsys):
    assert main(["-i", chain_set.folder, "-a", "dump"]) == 0
    table = capsys.readouterr().out
    for point in chain_set.points:
        assert point in table
    assert "crash" in table and "CONSISTENCY" in table
    assert main(["-i", chain_set.folder, "-a", "dump", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [p["name"] for p in doc["points"]] == chain_set.points
    assert doc["points"][0]["consistency"] == "crash"
    assert doc["points"][1]["parent"] == "virtnbdbackup.0"
    assert doc["points"][0]["disks"]["sda"]["virtual_size"] == chain_set.size


def test_verify_good_set(chain_set, capsys):
    assert main(["-i", chain_set.folder, "-a", "verify", "-w", "3"]) == 0
    err = capsys.readouterr().err
    assert "12 file(s) ok" in err and "0 problem(s)" in err


def test_adjust_config(chain_set, tmp_path):
    nvram = os.path.join(chain_set.folder, "vnbdtest-set_VARS.fd")
    with open(nvram, "wb") as f:
        f.write(b"NVRAM" * 100)
    try:
        out = str(tmp_path / "out")
        assert _restore(chain_set.folder, out, "-c", "--format", "raw") == 0
    finally:
        os.unlink(nvram)
    xml_path = os.path.join(out, "restore_vnbdtest-set.xml")
    root = etree.parse(xml_path).getroot()
    assert root.findtext("name") == "restore_vnbdtest-set"
    assert root.find("uuid") is None
    disks = root.findall("devices/disk")
    assert [d.get("device") for d in disks] == ["disk", "cdrom"]
    assert disks[0].find("source").get("file") == os.path.abspath(os.path.join(out, "sda.raw"))
    assert disks[0].find("driver").get("type") == "raw"
    assert root.find("devices/interface/mac").get("address") != "52:54:00:11:22:33"
    copied = root.findtext("os/nvram")
    assert copied == os.path.abspath(os.path.join(out, "restore_vnbdtest-set_VARS.fd"))
    with open(copied, "rb") as f:
        assert f.read() == b"NVRAM" * 100


def test_usage_errors_are_one_line(tmp_path, capsys):
    assert main(["-i", str(tmp_path)]) == 1
    assert "output" in capsys.readouterr().err
    assert main(["-i", str(tmp_path / "nope"), "-a", "dump"]) == 1
    err = capsys.readouterr().err
    assert "no such backup folder" in err and len(err.strip().splitlines()) == 1


def _strace_bytes_written(trace: str, suffix: str) -> int:
    """Bytes the kernel accepted in write calls on files whose path ends with ``suffix``
    (``strace -y`` prints each fd's path), summed from the return values of every
    thread's trace file (``-ff``: one file per thread, so no call is split by another)."""
    import glob
    import re

    total = 0
    for name in glob.glob(trace + ".*"):
        with open(name) as f:
            for line in f:
                m = re.search(r"\b(p?writev?2?|pwrite64)\(\d+<([^>]*)>.*\)\s+=\s+(\d+)", line)
                if m and m.group(2).endswith(suffix):
                    total += int(m.group(3))
    return total


def test_bytes_written_counted_by_the_kernel_too(tmp_path):
    """The restore's own ``bytes_written`` counter, checked from outside: strace sums what the
    process wrote into the raw image; both are the data of the final point, not of the chain."""
    import sys

    b = SetBuilder(str(tmp_path / "set"), seed=9)
    b.scribble(40)
    b.full()
    for _ in range(5):
        b.scribble(10)
        b.inc()
    data_in_final = sum(1 for c in b.allocated if any(b.shadow[c * b.cluster:(c + 1) * b.cluster])) * b.cluster
    trace, out = str(tmp_path / "trace"), tmp_path / "out"
    script = os.path.join(os.path.dirname(__file__), "..", "..", "virtnbdrestore")
    subprocess.run(["strace", "-ff", "-qq", "-y", "-e", "trace=write,pwrite64,pwritev,pwritev2", "-o", trace,
                    sys.executable, script, "-i", b.folder, "-o", str(out), "-n", "--format", "raw"],
                   check=True, capture_output=True, timeout=300)
    written = _strace_bytes_written(trace, "sda.raw.partial")
    [res] = _engine(b.folder, str(tmp_path / "out2"), "raw")
    assert written == res.bytes_written == data_in_final > 0
    compare(str(out / "sda.raw"), "raw", b.shadow_path(b.points[-1]))
