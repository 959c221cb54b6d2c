"""Every row of the abbbi/virtnbdbackup parity table does what README says; values checked up front."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from virtnbd import errors
from virtnbd.cli import backup, locations, parity, restore, shell
from virtnbd.ops import metrics

ROOT = Path(__file__).resolve().parents[2]
B = ["-d", "vm", "-o", "/b"]
R = ["-i", "/set", "-o", "/out"]


def _argv(row: parity.Foreign, flag: str) -> list[str]:
    return [flag, "x"] if row.takes_value else [flag]


@pytest.mark.parametrize(("table", "parse", "base"), [(parity.BACKUP, backup.parse, B),
                                                      (parity.RESTORE, restore.parse, R)])
def test_every_foreign_row_is_ignored_or_refused_as_documented(table, parse, base, capsys) -> None:  # type: ignore[no-untyped-def]
    readme = (ROOT / "README.md").read_text()
    for row in table:
        assert f"`{row.flags[-1]}`" in readme, f"{row.flags[-1]} missing from README's table"
        for flag in row.flags:
            if row.verdict == "refused":
                with pytest.raises(errors.UsageError, match=f"^{flag}: "):
                    parse([*base, *_argv(row, flag)])
            else:
                parse([*base, *_argv(row, flag)])
                assert "has no effect" in capsys.readouterr().err


def test_same_options_parse_like_the_best_known_tool() -> None:
    o = backup.parse_run(["-d", "vm", "-l", "auto", "-o", "/b", "-e", "-z", "3", "-w", "2", "-T", "1048576",
                          "-t", "stream", "-L", "--quiet", "-F", "/", "-n", "-p", "-v", "-x", "sdb", "-i", "sda"])
    assert o.strict and o.syslog and o.quiet and o.backup.compress_level == 3 and o.backup.workers == 2
    assert o.backup.threshold == 1 << 20 and o.backup.printonly and not o.many
    r = restore.parse(["-i", "/s", "-o", "/o", "-u", "virtnbdbackup.2", "-d", "sda", "-A", "-e", "-L", "/tmp/l",
                       "-c", "-N", "new", "-n", "-v"])
    assert (r.until, r.disk, r.preallocate, r.strict, r.logfile, r.name) == (
        "virtnbdbackup.2", "sda", True, True, "/tmp/l", "new")
    assert restore.parse(["-i", "/s", "-o", "/o", "-s", "/s/a.data,/s/b.data"]).sequence == ("/s/a.data", "/s/b.data")
    for flag in ("-V", "--version"):
        for parse in (backup.parse, restore.parse):
            with pytest.raises(SystemExit):
                parse([flag])


def test_restore_output_shortcuts() -> None:
    assert restore.parse(["-i", "/s", "-o", "verify"]).action == "verify"
    dumped = restore.parse(["-i", "/s", "-o", "dump"])
    assert dumped.action == "dump" and dumped.output is None
    assert restore.parse(["-i", "/s", "-o", "./verify"]).output == "./verify"
    with pytest.raises(errors.UsageError, match="means -a dump"):
        restore.parse(["-i", "/s", "-o", "dump", "-a", "verify"])


@pytest.mark.parametrize(("argv", "needle"), [
    ([*B, "-z", "99"], "lz4 compression level 99 out of range"),
    ([*B, "-z", "0", "--compress-method", "zstd"], "zstd compression level 0"),
    ([*B, "-w", "0"], "-w/--worker must be 1 or more"),
    ([*B, "--parallel", "0"], "--parallel"),
    (["-d", "vm", "-o", "ftp://host/x"], "unsupported scheme 'ftp://'"),
    (["-d", "vm", "-o", "-", "-l", "inc"], "-o -: a stream holds one new set"),
    (["-d", "a,b", "-o", "-", "-l", "full"], "-o - goes with one domain"),
    ([*B, "-t", "raw"], "virtnbdrestore --format raw"),
    ([*B, "-t", "qcow2", "-z"], "-z/--compress goes with -t stream"),
    (["-o", "/b"], "-d/--domain (or --all)"),
    ([*B, "--all"], "exclude each other"),
    ([*B, "--match", "x*"], "go with --all"),
])
def test_backup_values_checked_before_any_job(argv, needle) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(errors.UsageError) as err:
        backup.parse_run(argv)
    assert needle in str(err.value)


def test_restore_schemes_and_stdio_refused() -> None:
    with pytest.raises(errors.UsageError, match="unsupported scheme 'ftp://'"):
        restore.parse(["-i", "ftp://host/set", "-a", "verify"])
    assert restore.parse(["-i", "s3://bucket/set", "-a", "verify"]).input == "s3://bucket/set"   # object storage
    with pytest.raises(errors.UsageError, match="unsupported scheme 'ftp://'"):
        restore.parse(["-i", "/s", "-o", "ftp://host/x"])
    with pytest.raises(errors.UsageError, match="standard output"):
        restore.parse(["-i", "/s", "-o", "-", "--format", "qcow2"])
    to_stdout = restore.parse(["-i", "/s", "-o", "-"])
    assert (to_stdout.output, to_stdout.format) == ("-", "raw")
    assert restore.parse(["-i", "-", "-o", "/out"]).input == "-"
    assert restore.parse(["-i", "/s", "-o", "rbd:pool"]).output == "rbd:pool"


def test_scheme_registry_is_one_place() -> None:
    assert locations.scheme("S3://b") == "s3" and locations.scheme("/a/s3:/x") is None
    locations.register("test-role", "s3")
    assert locations.check("s3://b/x", "test-role", "-o") == "s3://b/x"


def test_many_domains_go_each_into_its_folder() -> None:
    o = backup.parse_run(["-d", "a,b", "-o", "/root", "--parallel", "2", "--json"])
    assert o.many and o.domains == ("a", "b") and o.parallel == 2
    assert o.for_domain("b").backup.output == "/root/b" and o.for_domain("b").backup.domain == "b"
    single = backup.parse_run(["-d", "a", "-o", "/root"])
    assert single.for_domain("a").backup.output == "/root"


def test_closed_stdout_pipe_ends_quietly(tmp_path: Path) -> None:
    code = ("import sys\nfrom virtnbd.cli.shell import run_main\n"
            "def run(_o):\n    for _ in range(100000):\n        print('x' * 80)\n"
            "sys.exit(run_main('t', [], lambda a: object(), run))\n")
    proc = subprocess.run(f"{sys.executable} -c \"{code}\" | head -1", shell=True,  # noqa: S602 - the pipe is the test
                          capture_output=True, text=True, timeout=60, check=False, cwd=ROOT)
    assert proc.stdout == "x" * 80 + "\n" and proc.stderr == ""


def test_wrapper_before_setup_prints_one_line(tmp_path: Path) -> None:
    for name in ("virtnbdbackup", "virtnbdrestore"):
        copy = tmp_path / name
        copy.write_text((ROOT / name).read_text())
        proc = subprocess.run(["/usr/bin/python3", "-I", str(copy)], capture_output=True, text=True, timeout=60,
                              check=False)
        assert proc.returncode == 1 and len(proc.stderr.splitlines()) == 1
        assert "run ./scripts/setup" in proc.stderr and "Traceback" not in proc.stderr


def test_syslog_handler_sends_to_the_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "log")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(path)
        handler = shell.syslog_handler("virtnbdbackup", address=path)
        assert handler is not None
        import logging
        handler.handle(logging.LogRecord("x", logging.INFO, "f", 1, "hello %s", ("vm1",), None))
        handler.close()
        assert b"virtnbdbackup[" in server.recv(4096)
    assert shell.syslog_handler("p", address=str(tmp_path / "none")) is None


def test_metrics_merge_and_atomic(tmp_path: Path) -> None:
    path = str(tmp_path / "m.prom")
    metrics.write(path, [metrics.Outcome("a", True, 100.0, 2.5, 10, 20, 1), metrics.Outcome("b", False, 100.0, 1.0)])
    metrics.write(path, [metrics.Outcome("b", False, 200.0, 1.0), metrics.Outcome("c", True, 200.0, 1.0)])
    text = Path(path).read_text()
    assert 'virtnbd_backup_failures_total{domain="b"} 2' in text
    assert 'virtnbd_backup_last_success_timestamp_seconds{domain="a"} 100' in text     # kept from before
    assert 'virtnbd_backup_success{domain="c"} 1' in text and "# TYPE virtnbd_backup_failures_total counter" in text
    assert oct(os.stat(path).st_mode & 0o777) == "0o644"
    assert [p.name for p in tmp_path.iterdir()] == ["m.prom"]
