"""run_main: parse -> run -> exit code, one error line, never a traceback."""
from __future__ import annotations

import logging
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from virtnbd import errors
from virtnbd.cli import shell


@dataclass(frozen=True)
class Opts:
    verbose: bool = False
    strict: bool = False


@pytest.fixture(autouse=True)
def keep_process_state() -> Iterator[None]:
    """run_main installs signal handlers and replaces the root log handlers: undo both."""
    saved_signals = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    try:
        yield
    finally:
        for s, handler in saved_signals.items():
            signal.signal(s, handler)
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in saved_handlers:
            root.addHandler(h)
        root.setLevel(saved_level)


def parser() -> shell.OneLineParser:
    p = shell.OneLineParser(prog="tool")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--strict", action="store_true")
    p.add_argument("-d", "--domain", required=True)
    return p


def parse(argv: list[str]) -> Opts:
    ns = parser().parse_args(argv)
    return Opts(verbose=ns.verbose, strict=ns.strict)


def main(run, argv: list[str] | None = None) -> int:  # type: ignore[no-untyped-def]
    return shell.run_main("tool", ["-d", "dom"] if argv is None else argv, parse, run)


def stderr_lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "Traceback" not in captured.err
    return captured.err.splitlines()


def test_success_exits_zero_silently(capsys) -> None:  # type: ignore[no-untyped-def]
    ran: list[Opts] = []
    assert main(ran.append) == errors.EXIT_OK
    assert ran == [Opts()]
    assert stderr_lines(capsys) == []


@pytest.mark.parametrize(
    ("argv", "needle"),
    [(["--bogus", "-d", "x"], "unrecognized arguments: --bogus"), ([], "required: -d/--domain")],
)
def test_bad_option_is_one_line_exit_1_and_run_never_called(capsys, argv, needle) -> None:  # type: ignore[no-untyped-def]
    ran: list[Opts] = []
    assert main(ran.append, argv) == errors.EXIT_ERROR
    assert ran == []
    lines = stderr_lines(capsys)
    assert len(lines) == 1
    assert lines[0].startswith("tool: error: ")
    assert needle in lines[0]


def test_library_error_is_one_line_with_its_message(capsys) -> None:  # type: ignore[no-untyped-def]
    def run(_: Opts) -> None:
        try:
            raise KeyError("inner detail")
        except KeyError as err:
            raise errors.DomainNotFound(domain="vm1") from err

    assert main(run) == errors.EXIT_ERROR
    assert stderr_lines(capsys) == ["tool: error: domain not found: vm1"]


def test_error_exit_code_comes_from_the_class(capsys) -> None:  # type: ignore[no-untyped-def]
    class Odd(errors.VirtnbdError):
        template = "odd {x}"
        exit_code = 7

    def run(_: Opts) -> None:
        raise Odd(x=1)

    assert main(run) == 7
    assert stderr_lines(capsys) == ["tool: error: odd 1"]


def test_oserror_is_one_line_exit_1(capsys) -> None:  # type: ignore[no-untyped-def]
    def run(_: Opts) -> None:
        raise FileNotFoundError(2, "No such file or directory", "/nope")

    assert main(run) == errors.EXIT_ERROR
    lines = stderr_lines(capsys)
    assert len(lines) == 1
    assert "/nope" in lines[0]


def test_verbose_logs_details_but_still_no_traceback_on_console(capsys) -> None:  # type: ignore[no-untyped-def]
    def run(_: Opts) -> None:
        logging.getLogger("virtnbd.x").debug("step")
        raise errors.UsageError(reason="bad")

    assert main(run, ["-v", "-d", "x"]) == errors.EXIT_ERROR
    err = capsys.readouterr().err
    assert "tool: DEBUG: step" in err
    assert "tool: ERROR: error: bad" in err


@pytest.mark.parametrize(("strict", "warn", "code"), [(False, True, 0), (True, True, 2), (True, False, 0)])
def test_strict_turns_warnings_into_exit_2(capsys, strict, warn, code) -> None:  # type: ignore[no-untyped-def]
    def run(_: Opts) -> None:
        logging.getLogger("virtnbd.x").info("note")
        if warn:
            logging.getLogger("virtnbd.x").warning("disk sdb skipped")

    argv = ["-d", "x"] + (["--strict"] if strict else [])
    assert main(run, argv) == code
    lines = stderr_lines(capsys)
    assert lines[0] == "tool: note"
    assert lines[1:] == (["tool: disk sdb skipped"] if warn else [])


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_becomes_128_plus_n_and_cleanup_runs(capsys, signum) -> None:  # type: ignore[no-untyped-def]
    cleaned: list[bool] = []

    def run(_: Opts) -> None:
        try:
            os.kill(os.getpid(), signum)
            signal.sigtimedwait([], 0)  # let the handler run
            raise AssertionError("the signal did not interrupt run()")
        finally:
            cleaned.append(True)

    assert main(run) == 128 + signum
    assert cleaned == [True]
    lines = stderr_lines(capsys)
    assert lines == [f"tool: interrupted by signal {signal.Signals(signum).name}"]
    # further signals are ignored while cleanup finishes
    assert signal.getsignal(signum) == signal.SIG_IGN


def test_keyboard_interrupt_is_130(capsys) -> None:  # type: ignore[no-untyped-def]
    def run(_: Opts) -> None:
        raise KeyboardInterrupt

    assert main(run) == 130
    assert stderr_lines(capsys) == ["tool: interrupted"]


def test_one_line_parser_raises_usage_error() -> None:
    with pytest.raises(errors.UsageError, match="invalid choice"):
        p = shell.OneLineParser(prog="t")
        p.add_argument("-l", choices=["full", "inc"])
        p.parse_args(["-l", "bogus"])
