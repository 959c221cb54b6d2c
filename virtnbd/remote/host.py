"""THE interface to the host a domain's disks live on: this one, or a remote KVM host over ssh.

A backup asks its host (``current()``) for everything that touches the disks' machine outside
libvirt: commands (``qemu-img``), side files (firmware, NVRAM, TPM state), a private work folder
for scratch files and sockets, where the job's NBD server listens, and qemu-nbd exports of a
shut-off domain. ``LocalHost`` does it here; ``RemoteHost`` (remote/remotehost.py) over one ssh
connection. ``using(host)`` makes a host the current one for a run.
"""
from __future__ import annotations

import contextlib
import contextvars
import ctypes
import io
import os
import secrets
import shutil
import signal
import subprocess
import tarfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from virtnbd import errors, fsutil, qemunbd
from virtnbd.source.nbdsource import Address
from virtnbd.virt.xmlbuild import TcpServer

QEMU_NBD = "qemu-nbd"
START_TIMEOUT = 30.0
PR_SET_PDEATHSIG = 1
QEMU_USER_MODE = 0o1733   # qemu (libvirt-qemu) creates its socket/scratch here; nobody can list it


@dataclass(frozen=True)
class ExportSpec:
    """One disk image to export read-only (offline backups)."""

    target: str
    path: str
    format: str
    bitmap: str | None = None


@dataclass
class RemoteFacts:
    """What a run reports about its remote host (JSON summary)."""

    host: str = ""
    nbd: list[str] = field(default_factory=list)     # addresses the client read from
    tls: bool = True
    ssh_round_trips: int = 0                          # ssh sessions opened (the master, the run's shell, ...)
    remote_commands: int = 0                          # commands run through the run's one remote shell


class Host(Protocol):
    name: str

    def run(self, argv: Sequence[str], timeout: float) -> subprocess.CompletedProcess[str]: ...

    def read_file(self, path: str) -> bytes: ...   # OSError when it cannot

    def fetch_tree(self, path: str, dest: Path) -> bool: ...   # False: not a folder

    def work_dir(self, scratchdir: str, domain: str) -> AbstractContextManager[str]: ...

    def begin_job(self, begin: Callable[[str | TcpServer], None], workdir: str,
                  socketfile: str | None) -> Address: ...

    def exports(self, specs: Sequence[ExportSpec], workdir: str) -> AbstractContextManager[dict[str, Address]]: ...

    def facts(self) -> RemoteFacts | None: ...


# -- this host ----------------------------------------------------------------------

def die_with_parent() -> None:
    """In the child: SIGTERM when the backup process dies (a killed run leaves no export holding the image)."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stderr:
        proc.stderr.close()


def nbd_argv(spec: ExportSpec) -> list[str]:
    """qemu-nbd options of a read-only export of one image (without where it listens)."""
    cmd = [QEMU_NBD, "--read-only", "--persistent", "--shared=16", f"--format={spec.format}",
           f"--export-name={spec.target}", "--cache=none", "--aio=threads"]
    if spec.bitmap:
        cmd.append(f"--bitmap={spec.bitmap}")
    return cmd


class LocalHost:
    """The disks are on this machine: subprocesses, local files, unix sockets."""

    name = "localhost"

    def run(self, argv: Sequence[str], timeout: float) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)

    def read_file(self, path: str) -> bytes:
        return Path(path).read_bytes()

    def fetch_tree(self, path: str, dest: Path) -> bool:
        if not Path(path).is_dir():
            return False
        shutil.copytree(path, dest, symlinks=True)
        return True

    def work_dir(self, scratchdir: str, domain: str) -> AbstractContextManager[str]:
        return _as_str(local_work_dir(scratchdir))

    def begin_job(self, begin: Callable[[str | TcpServer], None], workdir: str,
                  socketfile: str | None) -> Address:
        socket = socketfile or str(Path(workdir) / "backup.sock")
        begin(socket)
        return socket

    @contextlib.contextmanager
    def exports(self, specs: Sequence[ExportSpec], workdir: str) -> Iterator[dict[str, Address]]:
        """One read-only qemu-nbd per disk on a unix socket; all stopped at exit."""
        if shutil.which(QEMU_NBD) is None:
            raise errors.UsageError(reason="offline backup needs qemu-nbd (package qemu-utils)")
        procs: list[subprocess.Popen[bytes]] = []
        sockets: dict[str, Address] = {}
        try:
            for spec in specs:
                socket = Path(workdir) / f"{spec.target}.nbd.sock"
                pidfile = str(Path(workdir) / f"{spec.target}.nbd.pid")
                proc = subprocess.Popen([*nbd_argv(spec), f"--socket={socket}", f"--pid-file={pidfile}", spec.path],
                                        stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                        preexec_fn=die_with_parent)  # noqa: PLW1509 (one call, no locks taken)
                procs.append(proc)
                try:
                    qemunbd.wait_ready(proc, pidfile, START_TIMEOUT)
                except qemunbd.NotReady as err:
                    raise errors.NbdError(export=spec.target, reason=err.reason) from None
                sockets[spec.target] = str(socket)
            yield sockets
        finally:
            for proc in procs:
                _stop(proc)

    def facts(self) -> RemoteFacts | None:
        return None


@contextlib.contextmanager
def _as_str(cm: AbstractContextManager[Path]) -> Iterator[str]:
    with cm as path:
        yield str(path)


@contextlib.contextmanager
def local_work_dir(scratchdir: str) -> Iterator[Path]:
    """Private folder ``virtnbd.<pid>.<random>`` for the socket and scratch files; removed at exit.

    The pid in the name lets a later run recognise a job left by a killed run.
    """
    base = Path(scratchdir)
    path = base / f"virtnbd.{os.getpid()}.{secrets.token_hex(4)}"
    try:
        path.mkdir(mode=0o700)
        os.chmod(path, QEMU_USER_MODE)
    except OSError as err:
        raise fsutil.storage_error(path, err) from err
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def untar(data: bytes, dest: Path) -> None:
    """Unpack a tar of a folder into ``dest`` (data filter: no absolute paths, links out, devices)."""
    dest.mkdir(mode=0o700)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(dest, filter="data")


# -- the run's host -------------------------------------------------------------------

_current: contextvars.ContextVar[Host | None] = contextvars.ContextVar("virtnbd_host", default=None)
_LOCAL = LocalHost()


def current() -> Host:
    """The run's host (threads started by the run see it through ``contextvars.copy_context``; default local)."""
    return _current.get() or _LOCAL


@contextlib.contextmanager
def using(host: Host) -> Iterator[Host]:  # noqa: D103
    token = _current.set(host)
    try:
        yield host
    finally:
        _current.reset(token)
