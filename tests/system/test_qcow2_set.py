"""qcow2 sets (-t qcow2, pull engine) of a running domain with two disks (issue 12).

full -> writes (data, patterns, write-zeroes, discards, also 4 KiB-aligned) -> inc x3 -> diff -> inc:
each point's image compares identical to the disk at that point, each point restores identical
with virtnbdrestore --until, the folder copied with cp -a still compares identical, verify passes,
dump names the kind.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.lab.libvirt_lab import JOB_SAFE_KINDS, DiskSpec, MiB, compare_images, random_writes
from tests.system.backup_helpers import REPO, ok
from tests.system.chain_helpers import check_restored

pytestmark = pytest.mark.system

SIZE = 24 * MiB
DISKS = ("sda", "sdb")
PLAN = ("inc", "inc", "inc", "diff", "inc")


def restore_cli(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, str(REPO / "virtnbdrestore"), "-n", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)


def image_info(path: Path) -> dict:  # type: ignore[type-arg]
    out = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(path)], capture_output=True, text=True,
                         check=True).stdout
    return dict(json.loads(out))


def servers_of(folder: Path) -> list[int]:
    """Live qemu-nbd processes serving a file of ``folder`` (zombies have no command line)."""
    found = []
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"qemu-nbd") and any(str(folder).encode() in a for a in argv):
            found.append(pid)
    return found


def build_chain(dom, folder: Path) -> dict[str, dict[str, Path]]:  # type: ignore[no-untyped-def]
    """full -> inc x3 -> diff -> inc with -t qcow2; the expected image of every disk at every point."""
    expected: dict[str, dict[str, Path]] = {}
    for n, target in enumerate(DISKS):
        dom.disk(target).apply_all(random_writes(seed=40 + n, n=16, size=SIZE))
    summary = ok(dom, "full", folder, "-t", "qcow2")
    expected[summary["point"]] = {t: dom.disk(t).snapshot("q0") for t in DISKS}
    for step, level in enumerate(PLAN, start=1):
        for n, target in enumerate(DISKS):
            # step 2: 4 KiB-aligned writes inside 64 KiB clusters (no discards: QEMU ignores a discard
            # smaller than a qcow2 cluster of the source disk, so its result is not known)
            fine = {"align": 4096, "kinds": ("data", "pattern", "zero")} if step == 2 else {}
            dom.disk(target).apply_all(random_writes(seed=400 + 10 * step + n, n=12, size=SIZE, **fine))
        summary = ok(dom, level, folder, "-t", "qcow2")
        expected[summary["point"]] = {t: dom.disk(t).snapshot(f"q{step}") for t in DISKS}
    return expected


def check_images(folder: Path, expected: dict[str, dict[str, Path]]) -> None:
    """Each point's image by itself (with its backing chain) is the disk at that point."""
    for point, images in expected.items():
        for target, image in images.items():
            compare_images(folder / f"{target}.{point}.qcow2", image, fmt="qcow2")


def test_qcow2_chain_every_point_exact(make_domain, tmp_path) -> None:  # type: ignore[no-untyped-def]
    dom = make_domain(disks=[DiskSpec(t, "sata", "qcow2", SIZE) for t in DISKS])
    folder = dom.dir / "backup"
    expected = build_chain(dom, folder)
    manifest = json.loads((folder / "virtnbd.manifest.json").read_text())
    names = [p["name"] for p in manifest["points"]]
    assert names == list(expected)
    assert [p["level"] for p in manifest["points"]] == ["full", *PLAN]
    assert json.loads((folder / "virtnbd.set.json").read_text())["kind"] == "qcow2"
    assert not list(folder.glob("*.partial")) and not list(folder.glob("*.data"))

    # layout: full standalone, inc on the previous full/inc, diff on the newest full/inc, relative names
    chain_parent = {names[1]: names[0], names[2]: names[1], names[3]: names[2], names[4]: names[3],
                    names[5]: names[3]}
    assert "backing-filename" not in image_info(folder / f"sda.{names[0]}.qcow2")
    for point, parent in chain_parent.items():
        info = image_info(folder / f"sda.{point}.qcow2")
        assert info["backing-filename"] == f"sda.{parent}.qcow2", (point, info)
        assert info["backing-filename-format"] == "qcow2"
    check_images(folder, expected)

    # thin: the full holds about the data written, an inc far less than the disk
    full_size = (folder / f"sda.{names[0]}.qcow2").stat().st_size
    assert full_size < SIZE, full_size

    for point, images in expected.items():
        check_restored(folder, point, images, tmp_path)

    moved = tmp_path / "moved"
    shutil.copytree(folder, moved, symlinks=True)
    subprocess.run(["cp", "-a", str(folder), str(tmp_path / "copied")], check=True)
    for where in (tmp_path / "copied", moved):
        check_images(where, expected)
    shutil.rmtree(folder)          # the copy stands alone
    proc = restore_cli("-i", str(tmp_path / "copied"), "-a", "verify")
    assert proc.returncode == 0, proc.stderr
    check_restored(tmp_path / "copied", names[-1], expected[names[-1]], tmp_path / "r2")

    dump = restore_cli("-i", str(tmp_path / "copied"), "-a", "dump", "--json")
    assert dump.returncode == 0, dump.stderr
    assert json.loads(dump.stdout)["kind"] == "qcow2"


def test_qcow2_flipped_bytes_caught(make_domain, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """30 single-byte flips at random offsets of the set's images: verify names file and region every
    time; a restore of the point refuses (or, never seen, is exact)."""
    import random

    from virtnbd import errors
    from virtnbd.restore import verify as verify_mod
    from virtnbd.restore.options import RestoreOptions
    from virtnbd.restore.run import restore, select

    dom = make_domain(disks=[DiskSpec(t, "sata", "qcow2", 16 * MiB) for t in DISKS])
    folder = dom.dir / "backup"
    expected: dict[str, dict[str, Path]] = {}
    for step, level in enumerate(("full", "inc", "inc")):
        for n, target in enumerate(DISKS):
            dom.disk(target).apply_all(random_writes(seed=700 + 10 * step + n, n=10, size=16 * MiB))
        point = ok(dom, level, folder, "-t", "qcow2")["point"]
        expected[point] = {t: dom.disk(t).snapshot(f"f{step}") for t in DISKS}
    verify_mod.run(verify_mod.select_all(str(folder), None, None))       # intact: passes
    manifest = json.loads((folder / "virtnbd.manifest.json").read_text())
    files = {e["file"]: (p["name"], e["extra"]["integrity"]["region_bytes"])
             for p in manifest["points"] for e in p["disks"].values()}
    sizes = {name: (folder / name).stat().st_size for name in files}
    rng = random.Random(12)
    refused = 0
    for flip in range(30):
        name = rng.choices(list(sizes), weights=list(sizes.values()))[0]
        offset = rng.randrange(sizes[name])
        path = folder / name
        with path.open("r+b") as f:
            f.seek(offset)
            old = f.read(1)
            f.seek(offset)
            f.write(bytes([old[0] ^ rng.randrange(1, 256)]))
        try:
            with pytest.raises(errors.VirtnbdError) as caught:
                verify_mod.run(verify_mod.select_all(str(folder), None, None))
            region = files[name][1]
            start = offset // region * region
            assert name in str(caught.value) and f"file bytes {start}..{start + region}" in \
                str(caught.value).replace(f"..{sizes[name]}", f"..{start + region}"), (flip, offset, caught.value)
            point = files[name][0]
            out = tmp_path / f"flip{flip}"
            try:
                restore(select(str(folder), point, None),
                        RestoreOptions(input=str(folder), output=str(out), until=point, format="raw", noprogress=True))
            except errors.VirtnbdError as err:
                assert name in str(err), err
                refused += 1
                assert not list(out.glob("*.raw")), "a refused restore left an image"
            else:
                for target, image in expected[point].items():
                    compare_images(out / f"{target}.raw", image, fmt="raw")
        finally:
            with path.open("r+b") as f:
                f.seek(offset)
                f.write(old)
    assert refused == 30
    verify_mod.run(verify_mod.select_all(str(folder), None, None))


@pytest.mark.parametrize("sig", [15, 9], ids=["SIGTERM", "SIGKILL"])
def test_qcow2_killed_inc_leaves_nothing(make_domain, tmp_path, sig) -> None:  # type: ignore[no-untyped-def]
    """SIGTERM/SIGKILL in the middle of an inc's image: no point, no qemu-nbd left; SIGTERM also leaves
    no job, no checkpoint, no partial image (after SIGKILL the next run clears them); the next inc is exact."""
    import time

    from tests.system.backup_helpers import backup_cmd, env, job_running, leftovers

    dom = make_domain(disks=[DiskSpec("sda", "sata", "qcow2", 64 * MiB)])
    sda = dom.disk("sda")
    folder = dom.dir / "backup"
    sda.write_data(0, 4 * MiB, seed=1)
    ok(dom, "full", folder, "-t", "qcow2")
    expected = {"virtnbdbackup.0": {"sda": sda.snapshot("k0")}}
    sda.write_data(8 * MiB, 48 * MiB, seed=2)
    proc = subprocess.Popen(backup_cmd(dom, "inc", folder, "-t", "qcow2", "--read-size", "4K"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
    deadline = time.monotonic() + 60
    try:
        while not [p for p in folder.glob("*.partial") if p.stat().st_size > 2 * MiB]:
            assert proc.poll() is None, f"backup ended before it could be killed: {proc.communicate()}"
            assert time.monotonic() < deadline, "no partial image grew"
            time.sleep(0.005)
        proc.send_signal(sig)
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    names = [p["name"] for p in json.loads((folder / "virtnbd.manifest.json").read_text())["points"]]
    assert names == ["virtnbdbackup.0"]
    assert not (folder / "sda.virtnbdbackup.1.qcow2").exists()
    if sig == 15:
        assert proc.returncode == 128 + sig, err
        assert "interrupted by signal SIGTERM" in err
        assert not job_running(dom)
        assert leftovers(folder, dom.dir) == []
        assert [c.getName() for c in dom.dom.listAllCheckpoints()] == ["virtnbdbackup.0"]
    else:
        assert proc.returncode == -sig
    time.sleep(0.5)
    assert not servers_of(folder), "a qemu-nbd of the killed run is still there"

    sda.apply_all(random_writes(seed=3, n=20, size=64 * MiB, kinds=JOB_SAFE_KINDS))   # a stale job may run
    assert ok(dom, "inc", folder, "-t", "qcow2")["point"] == "virtnbdbackup.1"
    assert not job_running(dom)
    assert leftovers(folder, dom.dir) == []
    expected["virtnbdbackup.1"] = {"sda": sda.snapshot("k1")}
    for point, images in expected.items():
        compare_images(folder / f"sda.{point}.qcow2", images["sda"], fmt="qcow2")
        check_restored(folder, point, images, tmp_path)


def test_qcow2_disks_change_offline_raw_include(make_domain, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """-x, a raw disk, a disk hot-plugged and one grown mid-chain, an offline inc, -p and a -i copy:
    every image and every restore exact; new, grown and raw disks get standalone images."""
    size = 12 * MiB
    dom = make_domain(disks=[DiskSpec("sda", "sata", "qcow2", size), DiskSpec("sdb", "sata", "raw", size),
                             DiskSpec("sdc", "sata", "qcow2", 4 * MiB)])
    folder = dom.dir / "backup"
    expected: dict[str, dict[str, Path]] = {}

    def step(seed: int, level: str, *extra: str) -> str:
        for n, disk in enumerate(dom.disks.values()):
            disk.apply_all(random_writes(seed=seed + n, n=6, size=disk.size))
        point = str(ok(dom, level, folder, "-t", "qcow2", "-x", "sdc", *extra)["point"])
        expected[point] = {t: d.snapshot(f"{point}-{t}") for t, d in dom.disks.items() if t != "sdc"}
        return point

    step(900, "full")
    printonly = ok(dom, "inc", folder, "-t", "qcow2", "-p")
    assert printonly["skipped"] and not list(folder.glob("*.virtnbdbackup.1.*"))
    dom.attach_disk(DiskSpec("vdb", "virtio", "qcow2", 4 * MiB))
    dom.disk("sda").resize(size + 4 * MiB)
    p1 = step(910, "inc")
    p2 = step(920, "inc")
    dom.stop()
    p3 = step(930, "inc")                       # offline: read from the images with qemu-nbd
    dom.start()
    p4 = step(940, "inc")
    backing = {p: image_info(folder / f"{t}.{p}.qcow2").get("backing-filename")
               for p in (p1, p2, p3, p4) for t in ("sda", "sdb", "vdb")}
    assert backing[p1] is None                  # sda grown, sdb raw, vdb new: standalone
    assert image_info(folder / f"sda.{p2}.qcow2")["backing-filename"] == f"sda.{p1}.qcow2"
    assert image_info(folder / f"vdb.{p3}.qcow2")["backing-filename"] == f"vdb.{p2}.qcow2"
    assert "backing-filename" not in image_info(folder / f"sdb.{p3}.qcow2")   # raw disk: whole each time
    assert not list(folder.glob("sdc.*"))
    check_images(folder, expected)
    for point, images in expected.items():
        check_restored(folder, point, images, tmp_path)

    copy_dir = tmp_path / "copy"
    ok(dom, "copy", copy_dir, "-t", "qcow2", "-i", "sda")
    assert sorted(p.name for p in copy_dir.glob("*.qcow2")) == ["sda.copy.qcow2"]
    compare_images(copy_dir / "sda.copy.qcow2", dom.disk("sda").snapshot("copy"), fmt="qcow2")


def test_qcow2_threshold_pause_and_restore_config(make_domain, libvirt_conn, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """-T and --pause with -t qcow2, pulled and pushed: below the threshold nothing is written (no image,
    no partial, no checkpoint), above it the point is taken with the domain paused around the job's start.
    Then -c, -N and -D of a restore from the qcow2 set: the adjusted XML (written, then defined under the
    new name) boots the restored files, which are the disk at that point."""
    import uuid

    import libvirt
    from lxml import etree

    from tests.system.backup_helpers import backup

    dom = make_domain(disks=[DiskSpec("sda", "sata", "qcow2", 8 * MiB)])
    sda = dom.disk("sda")
    folder = dom.dir / "backup"
    sda.write_data(0, 2 * MiB, seed=61)
    expected: dict[str, dict[str, Path]] = {}

    def paused(level: str, *extra: str) -> str:
        res = backup(dom, level, folder, "-t", "qcow2", "--pause", *extra)
        assert res.rc == 0 and res.summary is not None, res.stderr
        assert "paused for" in res.stderr, res.stderr
        assert dom.dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
        point = str(res.summary["point"])
        expected[point] = {"sda": sda.snapshot(point)}
        return point

    paused("full")
    sda.write_data(4 * MiB, 64 << 10, seed=62)
    for push in ((), ("--push",)):
        summary = ok(dom, "inc", folder, "-t", "qcow2", "-T", "1M", *push)
        assert summary["skipped"] and summary["reason"] == "below threshold", summary
    assert [c.getName() for c in dom.dom.listAllCheckpoints()] == ["virtnbdbackup.0"]
    assert sorted(p.name for p in folder.glob("sda.*.qcow2*")) == ["sda.virtnbdbackup.0.qcow2"]
    p1 = paused("inc", "-T", "32K", "--push")
    sda.write_data(6 * MiB, 128 << 10, seed=63)
    p2 = paused("inc", "-T", "32K")
    manifest = json.loads((folder / "virtnbd.manifest.json").read_text())
    assert [(p["name"], p["consistency"]) for p in manifest["points"]] == \
        [("virtnbdbackup.0", "paused"), (p1, "paused"), (p2, "paused")]
    check_images(folder, expected)

    name = f"vnbdtest-q12r{uuid.uuid4().hex[:6]}"
    out = tmp_path / "adjusted"
    proc = restore_cli("-i", str(folder), "-o", str(out), "--until", p1, "--format", "qcow2", "-c", "-N", name)
    assert proc.returncode == 0, proc.stderr
    root = etree.parse(str(out / f"{name}.xml")).getroot()
    assert root.findtext("name") == name and root.find("uuid") is None
    assert root.find("devices/disk/source").get("file") == str(out / "sda.qcow2")
    assert root.find("devices/disk/driver").get("type") == "qcow2"
    compare_images(out / "sda.qcow2", expected[p1]["sda"], fmt="qcow2")
    with pytest.raises(libvirt.libvirtError):
        libvirt_conn.lookupByName(name)                  # -c alone defines nothing

    out = tmp_path / "defined"
    proc = restore_cli("-i", str(folder), "-o", str(out), "--format", "raw", "-D", "-N", name)
    assert proc.returncode == 0, proc.stderr
    defined = libvirt_conn.lookupByName(name)
    try:
        root = etree.fromstring(defined.XMLDesc(0).encode())
        assert defined.UUIDString() != dom.dom.UUIDString() and not defined.isActive()
        assert root.find("devices/disk/source").get("file") == str(out / "sda.raw")
        assert root.find("devices/disk/driver").get("type") == "raw"
        compare_images(out / "sda.raw", expected[p2]["sda"], fmt="raw")
    finally:
        defined.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)
