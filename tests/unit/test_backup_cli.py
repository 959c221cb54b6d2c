"""virtnbdbackup argv -> BackupOptions."""
from __future__ import annotations

import pytest

from virtnbd import errors
from virtnbd.cli.backup import parse, parse_size


def test_defaults_and_lists() -> None:
    o = parse(["-d", "vm", "-o", "/b", "-i", "sda,vdb", "-i", "vdc", "-x", "sdz"])
    assert (o.domain, o.level, o.output) == ("vm", "copy", "/b")
    assert o.include == ("sda", "vdb", "vdc") and o.exclude == ("sdz",)
    assert not o.compress and o.method is None
    assert o.quiesce.freeze and o.quiesce.timeout == 10


def test_compress_level_optional() -> None:
    assert parse(["-d", "vm", "-o", "/b", "-z"]).method == "lz4"
    o = parse(["-d", "vm", "-o", "/b", "-z", "5", "--compress-method", "zstd"])
    assert (o.method, o.compress_level) == ("zstd", 5)


def test_freeze_options() -> None:
    o = parse(["-d", "vm", "-o", "/b", "-F", "/,/var", "--agent-timeout", "3"])
    assert o.quiesce.mountpoints == ("/", "/var") and o.quiesce.timeout == 3
    assert not parse(["-d", "vm", "-o", "/b", "--no-freeze"]).quiesce.freeze
    paused = parse(["-d", "vm", "-o", "/b", "--pause"]).quiesce
    assert paused.pause and not paused.freeze
    with pytest.raises(errors.UsageError, match="exclude each other"):
        parse(["-d", "vm", "-o", "/b", "--no-freeze", "-F", "/"])


def test_sizes() -> None:
    assert parse_size("4096") == 4096
    assert parse_size("64M") == 64 << 20 and parse_size("1g") == 1 << 30 and parse_size("512KiB") == 512 << 10
    assert parse(["-d", "vm", "-o", "/b", "-T", "1M", "--read-size", "256K"]).threshold == 1 << 20
    with pytest.raises(errors.UsageError, match="read-size"):
        parse(["-d", "vm", "-o", "/b", "--read-size", "64M"])


def test_bad_input_is_a_usage_error() -> None:
    with pytest.raises(errors.UsageError, match="level"):
        parse(["-d", "vm", "-o", "/b", "-l", "weekly"])
    with pytest.raises(errors.UsageError, match="required"):
        parse(["-l", "full"])


@pytest.mark.parametrize(("extra", "message"), [
    (["-t", "qcow2", "-z"], "-t qcow2 writes plain qcow2 images: -z/--compress goes with -t stream"),
    (["-t", "qcow2", "--key-file", "/k"], "-t qcow2 sets are not encrypted: key options go with -t stream"),
    (["-t", "qcow2", "-o", "s3://bucket/vm"], "-t qcow2 sets are written into a local folder: s3:// goes with "
                                               "-t stream"),
    (["-t", "qcow2", "-o", "-"], "-o -: a stream set only (-t stream)"),
    (["--push"], "--push writes qcow2 sets: use -t qcow2 --push"),
])
def test_options_that_do_not_apply_to_qcow2_sets_are_refused(extra: list[str], message: str) -> None:
    """One clear line before anything connects: what does not apply to a qcow2 set, and what goes instead."""
    with pytest.raises(errors.UsageError) as caught:
        parse(["-d", "vm", "-o", "/b", *extra])
    assert str(caught.value.reason) == message


def test_qcow2_takes_threshold_pause_and_printonly() -> None:
    """-T, --pause and -p apply to qcow2 sets, pulled or pushed (tests/system/test_qcow2_set.py)."""
    for push in ([], ["--push"]):
        opts = parse(["-d", "vm", "-o", "/b", "-l", "inc", "-t", "qcow2", "-T", "64M", "--pause", "-p", *push])
        assert opts.threshold == 64 << 20 and opts.pause and opts.printonly and opts.push == bool(push)
