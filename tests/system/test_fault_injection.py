"""SIGKILL at random moments of backup runs; the next run must extend the chain exactly.

For every kill point: changes, a backup run killed (whole process group) at
that moment, more changes, then the next backup. The last committed point and
the next one must restore byte-exact against the shadow images, so no run
ever silently skips changes. Kill moments: deterministic random times spread
over a measured clean run, plus moments picked by what the run is doing
(right after libvirt created the new checkpoint, while a data file is written,
while the manifest is committed, right after the commit).
"""
from __future__ import annotations

import dataclasses
import os
import random
import shutil
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import IN_CI
from tests.lab.fault_lab import kill_points
from tests.lab.libvirt_lab import JOB_SAFE_KINDS, DiskSpec, MiB
from tests.system.backup_helpers import backup, backup_cmd, check_point, env, job_running, leftovers, ok
from tests.system.chain_helpers import checkpoint_names, points, snap_all, write_all

pytestmark = [pytest.mark.system, pytest.mark.slow]

SIZE = 16 * MiB
KILLS = 16            # SIGKILLs that really hit a running backup
MAX_RANDOM = 40
MANIFEST = "virtnbd.manifest.json"


def _wait_unused(path: Path, timeout: float = 10.0) -> None:
    """Until no process has ``path`` open."""
    deadline = time.monotonic() + timeout
    target = str(path)
    while time.monotonic() < deadline:
        busy = False
        for fd in Path("/proc").glob("[0-9]*/fd/*"):
            try:
                busy = os.readlink(fd) == target
            except OSError:
                continue
            if busy:
                break
        if not busy:
            return
        time.sleep(0.05)
    raise AssertionError(f"{path} still open {timeout}s after the kill")


def _write(dom, seed: int) -> None:  # type: ignore[no-untyped-def]
    write_all(dom, seed, 4, JOB_SAFE_KINDS)



def _newer_checkpoint(dom, folder: Path):  # type: ignore[no-untyped-def]
    known = len(dom.dom.listAllCheckpoints())
    return lambda: len(dom.dom.listAllCheckpoints()) > known


def _after_checkpoint(delay: float):  # type: ignore[no-untyped-def]
    """Kill ``delay`` seconds after the run's new checkpoint appeared (copy, side files, commit)."""
    def make(dom, folder: Path):  # type: ignore[no-untyped-def]
        seen: list[float] = []
        created = _newer_checkpoint(dom, folder)

        def predicate() -> bool:
            if not seen and created():
                seen.append(time.monotonic())
            return bool(seen) and time.monotonic() - seen[0] >= delay
        return predicate
    return make


def _syscall_target(folder: Path, what: str) -> Path:
    nxt = f"virtnbdbackup.{len([p for p in points(folder) if p.startswith('virtnbdbackup.')])}"
    # strace -P matches the rename's source: the temp file, renamed once it is complete and fsynced
    return {"manifest": folder / f".{MANIFEST}.tmp", "data": folder / f"sda.inc.{nxt}.data.partial",
            "checkpoint xml": folder / "checkpoints" / f".{nxt}.xml.tmp"}[what]


def _strace_kill(cmd: list[str], path: Path) -> list[str]:
    """``cmd`` SIGKILLed by strace at the syscall that renames the temp file ``path`` to its final name."""
    renames = "rename,renameat,renameat2"
    return ["strace", "-f", "-qq", "-o", "/dev/null", "-P", str(path), "-e", f"trace={renames}",
            "-e", f"inject={renames}:signal=SIGKILL", "--", *cmd]


def _manifest_tmp(folder: Path):  # type: ignore[no-untyped-def]
    return (folder / f".{MANIFEST}.tmp").exists


def _partial(folder: Path):  # type: ignore[no-untyped-def]
    return lambda: any(folder.glob("*.partial"))


def _committed(folder: Path):  # type: ignore[no-untyped-def]
    before = len(points(folder))
    return lambda: (folder / MANIFEST).exists() and len(points(folder)) > before


def _classify(dom, folder: Path, before: list[str]) -> str:  # type: ignore[no-untyped-def]
    now = points(folder)
    if len(now) > len(before):
        return "after commit"
    ours = [c for c in checkpoint_names(dom) if c.startswith("virtnbdbackup.")]
    if len(ours) > len([p for p in before if p.startswith("virtnbdbackup.")]):
        return "after checkpoint, before commit"
    return "before checkpoint"


def test_sigkill_at_random_moments_then_next_backup_exact(make_domain, crash_runner, tmp_path) -> None:  # type: ignore[no-untyped-def]
    dom = make_domain(disks=[DiskSpec("sda", "sata", "qcow2", SIZE)])
    folder = dom.dir / "backup"
    crash_runner.env = env()
    expected: dict[str, dict[str, Path]] = {}
    outcomes: Counter[str] = Counter()

    # a killed first run (auto into an empty folder), then the real full
    _write(dom, 1)
    crash_runner.kill_when(backup_cmd(dom, "auto", folder), _newer_checkpoint(dom, folder), deadline=30)
    assert points(folder) == []
    expected[ok(dom, "auto", folder)["point"]] = snap_all(dom, "full")

    # measure a clean inc, to spread the random kill moments over its duration
    _write(dom, 2)
    clean = crash_runner.run(backup_cmd(dom, "inc", folder))
    assert clean.returncode == 0, clean.stderr
    expected[points(folder)[-1]] = snap_all(dom, "clean")
    moments: list[tuple[str, object]] = [
        ("checkpoint created", _newer_checkpoint), ("data file written", _partial),
        ("manifest commit", _manifest_tmp), ("just committed", _committed)]
    if shutil.which("strace"):
        # deterministic kills inside the commit: at the rename of the data file, of the saved
        # checkpoint XML and of the manifest (temp file written and fsynced, not yet renamed)
        moments += [("syscall", "data"), ("syscall", "checkpoint xml"), ("syscall", "manifest")]
    elif IN_CI:
        pytest.fail("strace is missing (scripts/setup installs it)")
    rng = random.Random(7)
    moments += [("after checkpoint", _after_checkpoint(rng.uniform(0.0, 0.25))) for _ in range(5)]
    # a run's length varies (start-up dominates a small inc): more random moments than needed, stop at enough
    moments += [("time", t) for t in kill_points(seed=6, n=MAX_RANDOM, duration=clean.elapsed, hi=0.85)]

    for step, (_label, moment) in enumerate(moments, start=3):
        if sum(n for k, n in outcomes.items() if k != "finished" and not k.startswith("at ")) >= KILLS:
            break
        _write(dom, step)
        snap = snap_all(dom, f"k{step}")
        before = points(folder)
        level = "diff" if step % 7 == 0 and _label != "syscall" else "inc"
        cmd = backup_cmd(dom, level, folder)
        if isinstance(moment, float):
            out = crash_runner.kill_after(cmd, moment)
        elif isinstance(moment, str):
            out = crash_runner.run(_strace_kill(cmd, _syscall_target(folder, moment)))
            assert out.returncode in (-9, 137), f"strace did not kill at the {moment} rename: {out.stderr}"
            outcomes[f"at {moment} rename"] += 1
            out = dataclasses.replace(out, killed=True)
        else:
            takes_dom = moment is _newer_checkpoint or getattr(moment, "__name__", "") == "make"
            predicate = moment(dom, folder) if takes_dom else moment(folder)  # type: ignore[operator]
            out = crash_runner.kill_when(cmd, predicate, deadline=30)
        after = points(folder)
        assert after[:len(before)] == before, "a killed run changed committed points"
        assert len(after) - len(before) in (0, 1)
        outcomes[_classify(dom, folder, before) if out.killed else "finished"] += 1
        if len(after) > len(before):             # the kill came after the commit: that point is real
            expected[after[-1]] = snap
        # the last committed point is exact
        check_point(dom, folder, after[-1], expected[after[-1]], tmp_path)
        # the next backup (aborts the stale job, drops the orphan checkpoint) covers everything
        _write(dom, 100 + step)
        summary = ok(dom, "inc", folder)
        expected[summary["point"]] = snap_all(dom, f"n{step}")
        check_point(dom, folder, summary["point"], expected[summary["point"]], tmp_path)
        assert not job_running(dom)
        assert leftovers(folder, dom.dir) == []
        assert checkpoint_names(dom) == sorted(p for p in points(folder) if p.startswith("virtnbdbackup."))

    kills = sum(n for k, n in outcomes.items() if k != "finished" and not k.startswith("at "))
    print(f"\nkill outcomes: {dict(outcomes)}")
    assert kills >= KILLS, outcomes
    assert outcomes["before checkpoint"] and outcomes["after checkpoint, before commit"], outcomes
    # every point of the chain, start to end, is still exact (nothing lost on the way)
    committed = points(folder)
    for point in committed[::4] + committed[-1:]:
        check_point(dom, folder, point, expected[point], tmp_path)
    assert os.path.exists(folder / MANIFEST)


def test_killed_offline_runs_then_offline_and_online_runs_exact(make_domain, crash_runner, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """SIGKILL while a shut-off domain is backed up (qemu-nbd, bitmaps added with qemu-img): the next
    offline run cleans up, and an online run after a start copes with the bitmap QEMU loaded."""
    dom = make_domain(disks=[DiskSpec("sda", "sata", "qcow2", SIZE)])
    sda = dom.disk("sda")
    folder = dom.dir / "backup"
    crash_runner.env = env()
    _write(dom, 1)
    expected = {ok(dom, "full", folder)["point"]: snap_all(dom, "full")}
    dom.stop()

    def bitmap_added(name: str):  # type: ignore[no-untyped-def]
        return lambda: name in sda.bitmaps()

    kills = 0
    for step, delay in enumerate((0.05, 0.15, 0.3, None, None), start=2):
        _write(dom, step)
        snap = snap_all(dom, f"o{step}")
        before = points(folder)
        cmd = backup_cmd(dom, "inc", folder)
        nxt = f"virtnbdbackup.{len(before)}"
        out = (crash_runner.kill_after(cmd, delay) if delay is not None
               else crash_runner.kill_when(cmd, bitmap_added(nxt), deadline=30))
        kills += out.killed
        _wait_unused(sda.image)        # the killed run's qemu-nbd may take a moment to exit
        if len(points(folder)) > len(before):
            expected[points(folder)[-1]] = snap
        orphan = step == 5 and out.killed and nxt in sda.bitmaps() and len(points(folder)) == len(before)
        if step == 5:
            # the domain starts with the killed run's bitmap in its image: the online inc still works
            assert orphan, "the kill did not leave a bitmap behind"
            dom.start()
        _write(dom, 50 + step)
        res = backup(dom, "inc", folder)
        assert res.rc == 0 and res.summary is not None, res.stderr
        summary = res.summary
        if orphan:
            assert f"removed bitmap {nxt} that no checkpoint owned" in res.stderr, res.stderr
        expected[summary["point"]] = snap_all(dom, f"after{step}")
        check_point(dom, folder, summary["point"], expected[summary["point"]], tmp_path)
        if dom.is_active():
            dom.stop()
        assert sorted(sda.bitmaps()) == sorted(p for p in points(folder) if p.startswith("virtnbdbackup."))
        assert checkpoint_names(dom) == sorted(p for p in points(folder) if p.startswith("virtnbdbackup."))
    assert kills >= 3
    for point in points(folder):
        check_point(dom, folder, point, expected[point], tmp_path)
