"""A damaged chain (inc deleted, truncated, bit flipped) fails restore and verify naming the file,
and leaves no complete-looking output behind."""
from __future__ import annotations

import os

import pytest

from tests.functional.restore_sets import SetBuilder
from virtnbd.cli.restore import main
from virtnbd.restore.plan import Layer, collapse
from virtnbd.stream import format as fmt
from virtnbd.stream.detect import open_stream


def _set(folder: str) -> SetBuilder:
    b = SetBuilder(folder, seed=3)
    b.scribble(60)
    b.full()
    for _ in range(8):
        b.scribble(12, zero_share=0)
        b.inc()
    return b


def _used_frame_pos(b: SetBuilder, victim: str) -> int:
    """File position of a data frame of ``victim`` that the newest point still uses."""
    paths = [os.path.join(b.folder, f"sda.{'full' if i == 0 else 'inc.' + p}.data") for i, p in enumerate(b.points)]
    readers = [open_stream(p) for p in paths]
    try:
        plan = collapse([Layer(p, pt, r.meta.virtual_size, r.frames())
                         for p, pt, r in zip(paths, b.points, readers, strict=True)])
    finally:
        for r in readers:
            r.close()
    index = b.points.index(victim)
    return next(e.frame.pos for e in plan.extents if e.layer == index)


def _damage(b: SetBuilder, how: str) -> tuple[str, str]:
    victim = b.points[4]
    path = os.path.join(b.folder, f"sda.inc.{victim}.data")
    if how == "deleted":
        os.unlink(path)
    elif how == "truncated":
        os.truncate(path, os.path.getsize(path) - 1000)
    else:
        pos = _used_frame_pos(b, victim) + fmt.FRAME.size + 100
        with open(path, "r+b") as f:
            f.seek(pos)
            byte = f.read(1)
            f.seek(pos)
            f.write(bytes([byte[0] ^ 0x08]))
    return victim, path


@pytest.mark.parametrize("how", ["deleted", "truncated", "bitflip"])
@pytest.mark.parametrize("fmt_", ["qcow2", "raw", "qcow2-qemu-nbd"])
def test_damaged_chain_fails_restore_and_verify(tmp_path, capsys, how, fmt_):
    b = _set(str(tmp_path / "set"))
    victim, path = _damage(b, how)
    out = tmp_path / "out"
    extra = ["--format", "qcow2", "--preallocate"] if fmt_ == "qcow2-qemu-nbd" else ["--format", fmt_]
    assert main(["-i", b.folder, "-o", str(out), "-n", *extra]) == 1
    err = capsys.readouterr().err
    assert os.path.basename(path) in err and victim in err, err
    assert not out.exists() or os.listdir(out) == []
    assert main(["-i", b.folder, "-a", "verify"]) == 1
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert os.path.basename(path) in last and victim in last, err
    assert "8 file(s) ok" in err  # the summary covers every other file
    # points before the damage still restore
    assert main(["-i", b.folder, "-o", str(tmp_path / "early"), "-n", "--until", b.points[3]]) == 0


def test_bitflip_reports_the_offset(tmp_path, capsys):
    b = _set(str(tmp_path / "set"))
    _, path = _damage(b, "bitflip")
    assert main(["-i", b.folder, "-a", "verify", "-d", "sda"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "offset" in err and "checksum" in err
