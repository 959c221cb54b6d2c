"""The shell every command shares: parse → configure → run → exit code.

``run_main`` is the only place that turns exceptions into exit codes:
0 ok, 1 error, 2 warnings with ``--strict``, 128+N on signal N.
SIGINT and SIGTERM become :class:`virtnbd.errors.Interrupted` so that
``finally`` blocks (job abort, thaw, scratch cleanup) run.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import logging.handlers
import os
import signal
import sys
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any, NoReturn, Protocol

from virtnbd import allocator, errors
from virtnbd.secrets import RedactFilter, redact_text

log = logging.getLogger(__name__)


class HasCommonOptions(Protocol):
    verbose: bool
    strict: bool


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports bad input as one line and exit code 1."""

    def error(self, message: str) -> NoReturn:
        raise errors.UsageError(reason=message)


class WarningCounter(logging.Handler):
    """Counts WARNING records so ``--strict`` can turn them into exit 2."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno == logging.WARNING:
            self.count += 1


def _raise_interrupted(signum: int, _frame: FrameType | None) -> None:
    raise errors.Interrupted(signum=signum, signame=signal.Signals(signum).name)


def install_signal_handlers() -> None:
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _raise_interrupted)


def block_signals() -> None:
    """Ignore further SIGINT/SIGTERM while cleanup runs after the first one."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)


SYSLOG_SOCKET = "/dev/log"


def syslog_handler(prog: str, address: str = SYSLOG_SOCKET) -> logging.Handler | None:
    """``-L/--syslog``: the run's messages also go to syslog (None when no syslog socket exists)."""
    if not os.path.exists(address):     # SysLogHandler itself would drop every message silently
        return None
    try:
        handler = logging.handlers.SysLogHandler(address=address,
                                                 facility=logging.handlers.SysLogHandler.LOG_DAEMON)
    except OSError:
        return None
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter(f"{prog}[{os.getpid()}]: %(message)s"))
    handler.addFilter(RedactFilter())
    return handler


def file_handler(path: str) -> logging.Handler:
    """``-L/--logfile`` of virtnbdrestore: a DEBUG log appended to PATH (created 0600)."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
        handler = logging.FileHandler(path, encoding="utf-8")
    except OSError as err:
        raise errors.StorageError(path=path, reason=err.strerror or str(err)) from err
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactFilter())
    return handler


def _extra_handlers(prog: str, options: Any) -> list[logging.Handler]:
    handlers: list[logging.Handler] = []
    if getattr(options, "syslog", False):
        handler = syslog_handler(prog)
        if handler is None:
            print(f"{prog}: warning: no syslog socket {SYSLOG_SOCKET}; -L/--syslog has no effect", file=sys.stderr)
        else:
            handlers.append(handler)
    if getattr(options, "logfile", None):
        handlers.append(file_handler(options.logfile))
    return handlers


def configure_logging(prog: str, verbose: bool, quiet: bool = False) -> WarningCounter:
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(logging.DEBUG)
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.ERROR if quiet else logging.DEBUG if verbose else logging.INFO)
    fmt = f"{prog}: %(levelname)s: %(message)s" if verbose else f"{prog}: %(message)s"
    console.setFormatter(logging.Formatter(fmt))
    console.addFilter(RedactFilter())
    root.addHandler(console)
    counter = WarningCounter()
    root.addHandler(counter)
    return counter


def _error_line(prog: str, err: BaseException) -> str:
    return redact_text(f"{prog}: error: {err}")


def _stdout_closed() -> int:
    """The reader of our stdout went away (``| head``): end quietly, like any filter."""
    with contextlib.suppress(OSError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    return errors.EXIT_SIGNAL_BASE + signal.SIGPIPE


def run_main(
    prog: str,
    argv: Sequence[str] | None,
    parse: Callable[[Sequence[str]], Any],
    run: Callable[[Any], None],
) -> int:
    """Parse argv into an options record, run it, map the outcome to an exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        options = parse(args)
    except errors.VirtnbdError as err:
        print(_error_line(prog, err), file=sys.stderr)
        return err.exit_code
    counter = configure_logging(prog, getattr(options, "verbose", False), getattr(options, "quiet", False))
    try:
        for handler in _extra_handlers(prog, options):
            logging.getLogger().addHandler(handler)
    except errors.VirtnbdError as err:
        print(_error_line(prog, err), file=sys.stderr)
        return err.exit_code
    allocator.keep_frame_buffers()
    install_signal_handlers()
    try:
        run(options)
        sys.stdout.flush()
    except BrokenPipeError:
        return _stdout_closed()
    except errors.Interrupted as err:
        block_signals()
        log.error("%s", err)
        return err.exit_code
    except errors.VirtnbdError as err:
        block_signals()
        log.debug("details", exc_info=True)
        log.error("error: %s", err)
        return err.exit_code
    except KeyboardInterrupt:
        block_signals()
        log.error("interrupted")
        return errors.EXIT_SIGNAL_BASE + signal.SIGINT
    except OSError as err:
        block_signals()
        log.debug("details", exc_info=True)
        log.error("error: %s", err)
        return errors.EXIT_ERROR
    finally:
        logging.shutdown()
    if getattr(options, "strict", False) and counter.count:
        return errors.EXIT_WARNINGS
    return errors.EXIT_OK
