"""qcow2 image target: created with the backup-time options, written through qemu-nbd.

The image is created under a temporary name with ``qemu-img create`` and the
options recorded at backup time (cluster size, compat, lazy refcounts,
refcount bits, compression type, extended L2). A private ``qemu-nbd``
(unix socket in a 0700 temp folder, ``--cache=writeback``, ``-e workers``)
serves it; every worker thread gets its own NBD connection, so ``workers``
writes are in flight at once. The image is fresh and has no backing file, so
zero ranges are simply not written: unallocated clusters read as zeroes.
``commit`` flushes every connection, stops qemu-nbd (which closes the image
cleanly) and renames the file.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import threading
from collections.abc import Callable, Mapping
from typing import Any

from virtnbd import errors, qemunbd
from virtnbd.fsutil import fsync_dir, storage_error
from virtnbd.restore.targets.base import TargetBase, TargetRequest
from virtnbd.restore.targets.raw import refuse_existing, temp_name

log = logging.getLogger(__name__)

MAX_REQUEST = 32 * 1024 * 1024
START_TIMEOUT = 20.0


def create_options(info: Mapping[str, Any]) -> list[str]:
    """``qemu-img create -o`` items from a saved ``qemu-img info --output=json`` record."""
    if info.get("format") not in (None, "qcow2"):
        return []
    opts: list[str] = []
    if info.get("cluster-size"):
        opts.append(f"cluster_size={int(info['cluster-size'])}")
    spec = info.get("format-specific") or {}
    data = spec.get("data") or {} if spec.get("type") == "qcow2" else {}
    if data.get("compat"):
        opts.append(f"compat={data['compat']}")
    if "lazy-refcounts" in data:
        opts.append(f"lazy_refcounts={'on' if data['lazy-refcounts'] else 'off'}")
    if data.get("refcount-bits"):
        opts.append(f"refcount_bits={int(data['refcount-bits'])}")
    if data.get("compression-type"):
        opts.append(f"compression_type={data['compression-type']}")
    if data.get("extended-l2"):
        opts.append("extended_l2=on")
    return opts


def run_tool(argv: list[str], path: str) -> None:
    try:
        subprocess.run(argv, check=True, capture_output=True, text=True)
    except FileNotFoundError as err:
        raise errors.StorageError(path=path, reason=f"{argv[0]} not found (install qemu-utils)") from err
    except subprocess.CalledProcessError as err:
        reason = (err.stderr or err.stdout or "").strip().splitlines()
        raise errors.StorageError(path=path, reason=f"{argv[0]} failed: {reason[-1] if reason else err}") from err


class ServedImage:
    """An existing image served by a private ``qemu-nbd`` and written through libnbd (one connection per thread).

    ``qemu-nbd`` listens on a unix socket in a 0700 temp folder with ``--cache=writeback`` and ``-e``
    ``workers + 1`` connections. Without ``persistent`` it exits by itself once the last client is gone,
    so a killed writer leaves no server behind. Used by the qcow2 restore target and by the qcow2
    backup set's pull writer (``virtnbd/backupset/qcow2set.py``).
    """

    def __init__(self, path: str, workers: int, *, fmt: str = "qcow2", label: str | None = None,
                 persistent: bool = True, connect: Callable[[Any], None] | None = None) -> None:
        import nbd  # Debian python3-libnbd

        self._nbd = nbd
        self.path = path
        self.label = label or path
        self.workers = max(1, workers)
        self.fmt = fmt
        self.persistent = persistent
        self._lock = threading.Lock()
        self._local = threading.local()
        self._handles: list[Any] = []
        self._proc: subprocess.Popen[bytes] | None = None
        self._sockdir: str | None = None
        self.sock = ""
        self._connect = connect or (lambda h: h.connect_unix(self.sock))   # a remote server brings its own

    def start(self) -> None:
        self._sockdir = tempfile.mkdtemp(prefix="virtnbd-image-")
        self.sock = os.path.join(self._sockdir, "nbd.sock")
        pidfile = os.path.join(self._sockdir, "qemu-nbd.pid")
        argv = ["qemu-nbd", "-f", self.fmt, "--cache=writeback", "--aio=threads", "--discard=unmap",
                "-e", str(self.workers + 1), *(["-t"] if self.persistent else []), "-k", self.sock,
                f"--pid-file={pidfile}", self.path]
        try:
            self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.PIPE, start_new_session=True)
        except FileNotFoundError as err:
            raise errors.StorageError(path=self.label, reason="qemu-nbd not found (install qemu-utils)") from err
        try:
            qemunbd.wait_ready(self._proc, pidfile, START_TIMEOUT)
        except qemunbd.NotReady as err:
            raise errors.StorageError(path=self.label, reason=err.reason) from None

    def handle(self) -> Any:
        """This thread's NBD connection to the image."""
        h = getattr(self._local, "h", None)
        if h is None:
            h = self._nbd.NBD()
            try:
                self._connect(h)
            except self._nbd.Error as err:
                raise errors.NbdError(export=self.sock, reason=str(err)) from err
            with self._lock:
                self._handles.append(h)
            self._local.h = h
        return h

    def write(self, offset: int, data: bytes | memoryview) -> None:
        h = self.handle()
        view = memoryview(data)
        try:
            for pos in range(0, len(view), MAX_REQUEST):
                h.pwrite(view[pos:pos + MAX_REQUEST], offset + pos)
        except self._nbd.Error as err:
            raise errors.StorageError(path=self.path, reason=f"nbd write at {offset}: {err}") from err

    def zero(self, offset: int, length: int) -> None:
        """Zeroes at ``offset``: qemu records them as zero clusters (never exposing a backing file)."""
        h = self.handle()
        try:
            for pos in range(0, length, 1 << 30):
                h.zero(min(1 << 30, length - pos), offset + pos)
        except self._nbd.Error as err:
            raise errors.StorageError(path=self.path, reason=f"nbd write-zeroes at {offset}: {err}") from err

    def finish(self) -> None:
        """Flush every connection and stop qemu-nbd (the image is closed cleanly); raises on failure."""
        try:
            for h in self._handles:
                h.flush()
        except self._nbd.Error as err:
            raise errors.StorageError(path=self.path, reason=f"nbd flush: {err}") from err
        self._close_handles()
        self._stop_server(check=True)

    def stop(self) -> None:
        """Drop the connections and the server without checking anything (abort paths)."""
        self._close_handles()
        self._stop_server(check=False)

    def _close_handles(self) -> None:
        for h in self._handles:
            with contextlib.suppress(self._nbd.Error):
                h.shutdown()
        self._handles.clear()
        self._local = threading.local()

    def _stop_server(self, check: bool) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                rc = proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = proc.wait()
            err_text = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
            if proc.stderr:
                proc.stderr.close()
            if check and rc not in (0, -signal.SIGTERM):
                raise errors.StorageError(path=self.path, reason=f"qemu-nbd exited with {rc}: {err_text}")
        if self._sockdir is not None:
            shutil.rmtree(self._sockdir, ignore_errors=True)
            self._sockdir = None


class Qcow2Target(TargetBase):
    def __init__(self, request: TargetRequest) -> None:
        self.name = request.spec
        self.path = request.spec
        self.tmp = temp_name(self.path)
        self.virtual_size = request.virtual_size
        self.bytes_written = 0
        self.zero_bytes = 0
        self._lock = threading.Lock()
        self.image = ServedImage(self.tmp, request.workers, label=self.path)
        refuse_existing(self.path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp)
        try:
            opts = create_options(request.image_info)
            if request.preallocate:
                opts.append("preallocation=metadata")
            argv = ["qemu-img", "create", "-q", "-f", "qcow2"]
            if opts:
                argv += ["-o", ",".join(opts)]
            run_tool([*argv, self.tmp, str(self.virtual_size)], self.path)
            os.chmod(self.tmp, 0o600)
            self.image.start()
        except BaseException:
            self.abort()
            raise

    # -- Target ---------------------------------------------------------
    def write(self, offset: int, data: bytes | memoryview) -> None:
        self.image.write(offset, data)
        with self._lock:
            self.bytes_written += len(data)

    def zero(self, offset: int, length: int) -> None:
        # Fresh image without backing file: unallocated clusters read as zero.
        with self._lock:
            self.zero_bytes += length

    def commit(self) -> None:
        try:
            self.image.finish()
            os.replace(self.tmp, self.path)
            fsync_dir(os.path.dirname(os.path.abspath(self.path)))
        except OSError as err:
            self.abort()
            raise storage_error(self.path, err) from err
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        self.image.stop()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp)
