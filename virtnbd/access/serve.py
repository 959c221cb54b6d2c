"""Serve one disk at one point as an NBD export: nbdkit running our python plugin, supervised.

nbdkit runs in the foreground as our child (``--exit-with-parent``); the
pidfile it writes once it listens tells us it is ready. Its unix socket gets
group ``libvirt-qemu`` and mode 0660 so QEMU can open it. SIGINT/SIGTERM
(:class:`virtnbd.errors.Interrupted`) or ``--timeout`` stop it; the socket
is removed in every case.
"""
from __future__ import annotations

import contextlib
import grp
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from virtnbd import errors
from virtnbd.access.options import MapOptions
from virtnbd.backupset.store import scheme_of

log = logging.getLogger(__name__)

PLUGIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "nbdkit_plugin.py")
READY_TIMEOUT = 60.0
QEMU_GROUP = "libvirt-qemu"


@dataclass(frozen=True)
class Export:
    uri: str
    socket: str | None
    host: str | None
    port: int | None
    pid: int
    readonly: bool
    tls: bool
    process: Any = field(default=None, compare=False, repr=False)   # the nbdkit Popen


def nbdkit_argv(options: MapOptions, socket: str | None, pidfile: str) -> list[str]:
    """The nbdkit command line for ``options`` (pure: tests check it)."""
    argv = ["nbdkit", "--foreground", "--exit-with-parent", "-P", pidfile, "-t", str(options.threads)]
    if socket is not None:
        argv += ["-U", socket]
    elif options.listen is not None:
        argv += ["-i", options.listen[0], "-p", str(options.listen[1])]
        if not options.insecure:
            argv += ["--tls=require", f"--tls-certificates={options.tls_certificates}"]
    argv += ["--filter=cow"] if options.writable else ["-r"]
    path = os.pathsep.join(p for p in [*sys.path, _project_root()] if p and os.path.isdir(p))
    argv += ["python", PLUGIN, f"set={set_location(options.input)}", f"path={path}"]
    argv += [f"until={options.until}"] if options.until else []
    argv += [f"disk={options.disk}"] if options.disk else []
    return argv + _key_params(options)


def _key_params(options: MapOptions) -> list[str]:
    """Where the plugin finds the secret: file names only (a passphrase from the environment reaches
    nbdkit through its inherited environment, never its argv)."""
    spec = options.key
    params = [f"key_file={os.path.abspath(spec.key_file)}"] if spec.key_file else []
    params += [f"passphrase_file={os.path.abspath(spec.passphrase_file)}"] if spec.passphrase_file else []
    return params


def set_location(value: str) -> str:
    """A URL (``s3://``) as given, a folder made absolute (nbdkit runs elsewhere)."""
    return value if scheme_of(value) else os.path.abspath(value)


def _project_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def check_tools() -> None:
    if shutil.which("nbdkit") is None:
        raise errors.UsageError(reason="nbdkit not found: install the Debian packages nbdkit and "
                                       "nbdkit-plugin-python")


@contextlib.contextmanager
def serving(options: MapOptions) -> Iterator[Export]:
    """nbdkit serving the point while the block runs; stopped and cleaned up after."""
    check_tools()
    with tempfile.TemporaryDirectory(prefix="virtnbdmap-") as work:
        socket = options.socket
        if socket is None and options.listen is None:
            socket = os.path.join(work, "nbd.sock")
        if socket is not None and os.path.exists(socket):
            raise errors.UsageError(reason=f"{socket}: exists (another server, or left by a killed one: remove it)")
        pidfile = os.path.join(work, "nbdkit.pid")
        proc = subprocess.Popen(nbdkit_argv(options, socket, pidfile), stdin=subprocess.DEVNULL)
        try:
            _wait_ready(proc, pidfile)
            if socket is not None:
                _open_for_qemu(socket)
            yield _export(options, socket, proc)
        finally:
            _stop(proc)
            if socket is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(socket)


def _wait_ready(proc: subprocess.Popen[bytes], pidfile: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while not os.path.exists(pidfile):
        code = proc.poll()
        if code is not None:
            raise errors.RestoreError(reason=f"nbdkit exited with status {code} before serving (see above)")
        if time.monotonic() > deadline:
            raise errors.RestoreError(reason=f"nbdkit not ready after {READY_TIMEOUT:.0f} s")
        time.sleep(0.01)


def _open_for_qemu(socket: str) -> None:
    """QEMU runs as libvirt-qemu: give that group the socket (nbdkit makes it 0755 root)."""
    try:
        os.chown(socket, -1, grp.getgrnam(QEMU_GROUP).gr_gid)
    except (KeyError, PermissionError):
        log.debug("socket %s left to its owner's group", socket)
    os.chmod(socket, 0o660)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _export(options: MapOptions, socket: str | None, proc: subprocess.Popen[bytes]) -> Export:
    pid = proc.pid
    tls = options.listen is not None and not options.insecure
    if socket is not None:
        uri = f"nbd+unix:///?socket={socket}"
        return Export(uri, socket, None, None, pid, not options.writable, False, proc)
    host, port = options.listen or ("", 0)
    shown = f"[{host}]" if ":" in host else host
    uri = f"{'nbds' if tls else 'nbd'}://{shown}:{port}/"
    return Export(uri, None, host, port, pid, not options.writable, tls, proc)


def describe(export: Export, options: MapOptions) -> str:
    if options.json:
        return json.dumps({"uri": export.uri, "socket": export.socket, "host": export.host, "port": export.port,
                           "pid": export.pid, "readonly": export.readonly, "tls": export.tls,
                           "set": set_location(options.input), "until": options.until, "disk": options.disk})
    mode = "read-only" if export.readonly else "writable (copy-on-write, changes are discarded)"
    return f"serving {export.uri} ({mode}); stop with Ctrl-C or SIGTERM"


def run(options: MapOptions) -> None:
    from virtnbd.access.pointreader import select_chain
    from virtnbd.backupset import encrypted
    encrypted.use_for(options.input, options.key)               # a missing or wrong key fails here, in one line
    select_chain(options.input, options.until, options.disk)     # a wrong set/point/disk fails here, in one line
    with serving(options) as export:
        sys.stdout.write(describe(export, options) + "\n")
        sys.stdout.flush()
        _wait(options, export.process)


def _wait(options: MapOptions, proc: subprocess.Popen[bytes]) -> None:
    """Until a signal (raised as Interrupted by the shell), the timeout, or nbdkit's end."""
    deadline = None if options.timeout is None else time.monotonic() + options.timeout
    while deadline is None or time.monotonic() < deadline:
        if proc.poll() is not None:
            raise errors.RestoreError(reason=f"nbdkit stopped serving (status {proc.returncode})")
        time.sleep(0.2 if deadline is None else min(0.2, max(0.0, deadline - time.monotonic())))
    log.info("timeout of %s s reached: stopping", options.timeout)
