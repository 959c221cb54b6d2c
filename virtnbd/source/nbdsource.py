"""Thin libnbd client for reading a backup export fast and with bounded memory.

One :class:`NbdSource` holds one or more connections to the same export (more
than one only when the server advertises multi-conn). Every connection has a
thread that keeps up to ``depth`` aio reads in flight; :meth:`NbdSource.read`
returns a future of a :class:`Chunk`. Counters tell how many bytes were read.

Reads land in a fixed pool of buffers: memory is bounded by the pool, pages are
reused (no fresh allocation per request), and libnbd 1.14's Python binding,
which leaks a reference to every buffer passed to ``aio_pread``, cannot grow
the process. A caller must :meth:`Chunk.release` every chunk it got.
"""
from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from types import TracebackType

import nbd

from virtnbd import errors
from virtnbd.source.extents import BASE_ALLOCATION
from virtnbd.source.tcpwait import TcpWait

log = logging.getLogger(__name__)

_STOP = None
STATUS_TIMEOUT = 300.0          # seconds for one block-status answer over TCP


class _Buf:
    """One pooled read buffer and its libnbd wrapper (created once, reused)."""

    __slots__ = ("data", "views")

    def __init__(self, size: int) -> None:
        self.data = bytearray(size)
        self.views: dict[tuple[int, int], nbd.Buffer] = {}

    def target(self, start: int, length: int) -> nbd.Buffer:
        """A libnbd buffer over ``data[start:start + length]``, made once per (start, length).

        libnbd 1.14 reads ``len(buffer)`` bytes and keeps a reference to every
        object it is given: reusing the wrapper keeps that leak from growing.
        """
        key = (start, length)
        view = self.views.get(key)
        if view is None:
            view = self.views[key] = nbd.Buffer.from_buffer(memoryview(self.data)[start:start + length])
        return view


class BufferPool:
    """``count`` buffers of ``size`` bytes; :meth:`get` blocks while all are in use."""

    def __init__(self, count: int, size: int) -> None:
        self.size = size
        self.count = count
        self._free: queue.SimpleQueue[_Buf] = queue.SimpleQueue()
        self._made = 0
        self._lock = threading.Lock()

    def get(self) -> _Buf:
        try:
            return self._free.get_nowait()
        except queue.Empty:
            pass
        with self._lock:
            if self._made < self.count:
                self._made += 1
                return _Buf(self.size)
        return self._free.get()

    def put(self, buf: _Buf) -> None:
        self._free.put(buf)


class Chunk:
    """The bytes of one read; give the buffer back with :meth:`release`."""

    __slots__ = ("_buf", "_pool", "length", "offset")

    def __init__(self, offset: int, length: int, buf: _Buf, pool: BufferPool) -> None:
        self.offset = offset
        self.length = length
        self._buf: _Buf | None = buf
        self._pool = pool

    @property
    def buffer(self) -> bytearray:
        """The whole pooled buffer (only the first ``length`` bytes are this chunk's)."""
        if self._buf is None:
            raise ValueError("chunk already released")
        return self._buf.data

    @property
    def data(self) -> memoryview:
        return memoryview(self.buffer)[: self.length]

    def release(self) -> None:
        if self._buf is not None:
            self._pool.put(self._buf)
            self._buf = None


@dataclass
class Counters:
    bytes_read: int = 0
    requests: int = 0
    status_queries: int = 0


def _nbd_reason(err: nbd.Error) -> str:
    return str(err.string or err).replace("\n", " ")


@dataclass(frozen=True)
class TcpAddress:
    """An NBD server on TCP: TLS with client certificates from ``tls_dir`` unless it is None."""

    host: str
    port: int
    tls_dir: str | None = None
    timeout: float = 30.0           # seconds for connect + TLS handshake + option negotiation

    def __str__(self) -> str:
        return f"{'nbds' if self.tls_dir else 'nbd'}://{self.host}:{self.port}"


Address = str | TcpAddress          # a unix socket path, or TCP


def explain_tcp(address: TcpAddress, text: str) -> str:
    """Cause and fix of a failed TCP/TLS connect (libnbd's message in ``text``)."""
    where = f"{address.host}:{address.port}"
    if "certificate verification" in text or "verify" in text.lower() and "certif" in text.lower():
        return (f"the NBD server's TLS certificate at {where} does not match the name {address.host} or is not "
                f"signed by the CA in {address.tls_dir}/ca-cert.pem: issue the host's server certificate for that "
                f"name (CN/SAN) or dial a name it carries (--nbd-ip)")
    if "non-properly terminated" in text or "handshake" in text:
        return (f"the NBD server at {where} refused our TLS client certificate ({address.tls_dir}/client-cert.pem): "
                f"it must be signed by the CA in the host's backup_tls_x509_cert_dir ({text})")
    if "TLS" in text or "not supported" in text.lower():
        return f"TLS negotiation with {where} failed ({text}): the server and --tls-cert/--no-tls must agree"
    if "refused" in text or "timed out" in text or "No route" in text:
        return (f"cannot reach the NBD server at {where} ({text}): a firewall between the hosts must let TCP "
                f"ports {address.port}.. through (--nbd-port), or name a reachable address with --nbd-ip")
    return f"cannot connect to {where}: {text}"


def _connect_tcp(h: nbd.NBD, address: TcpAddress) -> None:
    if address.tls_dir:
        h.set_tls(nbd.TLS_REQUIRE)
        h.set_tls_certificates(address.tls_dir)
    h.aio_connect_tcp(address.host, str(address.port))
    wait = TcpWait(h)           # quick ACKs: no 40 ms stalls per reply of the haggling (see tcpwait)
    try:
        wait.until(lambda: not h.aio_is_connecting(), address.timeout, lambda: errors.NbdError(
            export=h.get_export_name(), reason=explain_tcp(address, f"connect timed out after {address.timeout:.0f}s")))
    finally:
        wait.close()
    if not h.aio_is_ready():
        raise nbd.Error("connection failed", 0)


def _open(socket: Address, export: str, contexts: Sequence[str]) -> nbd.NBD:
    h = nbd.NBD()
    try:
        # our buffers are pooled and every byte read is written: no need for
        # libnbd to zero each one before the read (a memset of every byte read)
        h.set_pread_initialize(False)
        h.set_export_name(export)
        for ctx in contexts:
            h.add_meta_context(ctx)
        if isinstance(socket, TcpAddress):
            _connect_tcp(h, socket)
        else:
            h.connect_unix(socket)
    except nbd.Error as err:
        why = explain_tcp(socket, _nbd_reason(err)) if isinstance(socket, TcpAddress) else \
            f"cannot connect to {socket}: {_nbd_reason(err)}"
        raise errors.NbdError(export=export, reason=why) from err
    for ctx in contexts:
        if not h.can_meta_context(ctx):
            with contextlib.suppress(nbd.Error):
                h.shutdown()
            raise errors.NbdError(export=export, reason=f"server does not offer metadata context {ctx}")
    return h


class _Read:
    """One chunk being read, perhaps in several requests."""

    __slots__ = ("chunk", "error", "fut", "parts")

    def __init__(self, chunk: Chunk, fut: Future[Chunk], parts: int) -> None:
        self.chunk = chunk
        self.fut = fut
        self.parts = parts              # requests not yet completed
        self.error: str | None = None   # the first failure


class _Connection(threading.Thread):
    """One NBD handle driven by its own thread; requests arrive through a queue."""

    def __init__(self, handle: nbd.NBD, export: str, depth: int, *, counters: Counters, lock: threading.Lock,
                 pool: BufferPool, request_size: int) -> None:
        super().__init__(name=f"nbd-{export}", daemon=True)
        self.h = handle
        self.export = export
        self.depth = depth
        self.pool = pool
        self.request_size = request_size
        self.requests: queue.SimpleQueue[tuple[int, int, Future[Chunk]] | None] = queue.SimpleQueue()
        self.counters = counters
        self.lock = lock
        self.in_flight = 0
        self.failure: BaseException | None = None

    def _complete(self, read: _Read, err: object) -> int:
        self.in_flight -= 1
        errnum = getattr(err, "value", 0)
        if errnum and read.error is None:
            read.error = os.strerror(errnum)
        read.parts -= 1
        if read.parts == 0:
            self._finish(read)
        return 1

    def _finish(self, read: _Read) -> None:
        chunk = read.chunk
        if read.error:
            chunk.release()
            read.fut.set_exception(errors.NbdError(
                export=self.export,
                reason=f"read of {chunk.length} bytes at offset {chunk.offset} failed: {read.error}"))
            return
        with self.lock:
            self.counters.bytes_read += chunk.length
            self.counters.requests += 1
        read.fut.set_result(chunk)

    def _issue(self, offset: int, length: int, fut: Future[Chunk]) -> None:
        """Read one chunk into one pooled buffer, in requests of at most ``request_size`` bytes."""
        buf = self.pool.get()
        read = _Read(Chunk(offset, length, buf, self.pool), fut, -(-length // self.request_size))
        for start in range(0, length, self.request_size):
            size = min(self.request_size, length - start)
            try:
                self.h.aio_pread(buf.target(start, size), offset + start,
                                 completion=lambda err, read=read: self._complete(read, err))
            except nbd.Error as err:
                read.parts -= -(-(length - start) // self.request_size)     # these will never complete
                read.error = read.error or _nbd_reason(err)
                if read.parts == 0:
                    self._finish(read)
                return
            self.in_flight += 1

    def run(self) -> None:
        stopping = False
        try:
            while not (stopping and self.in_flight == 0):
                while not stopping and self.in_flight < self.depth:
                    try:
                        item = self.requests.get(block=self.in_flight == 0)
                    except queue.Empty:
                        break
                    if item is _STOP:
                        stopping = True
                        break
                    self._issue(*item)
                if self.in_flight:
                    self.h.poll(-1)
        except nbd.Error as err:
            self.failure = errors.NbdError(export=self.export, reason=_nbd_reason(err))
            self._fail_pending()
        except BaseException as err:  # noqa: BLE001 - handed to the caller through the futures
            self.failure = err
            self._fail_pending()

    def _fail_pending(self) -> None:
        while True:
            try:
                item = self.requests.get_nowait()
            except queue.Empty:
                return
            if item is not _STOP:
                item[2].set_exception(self.failure or errors.NbdError(export=self.export, reason="connection lost"))

    def submit(self, offset: int, length: int) -> Future[Chunk]:
        fut: Future[Chunk] = Future()
        if self.failure is not None:
            fut.set_exception(self.failure)
        else:
            self.requests.put((offset, length, fut))
        return fut

    def stop(self) -> None:
        self.requests.put(_STOP)


class NbdSource:
    """Reads from one export; use as a context manager (connections always closed)."""

    def __init__(self, socket: Address, export: str, contexts: Sequence[str] = (BASE_ALLOCATION,),
                 connections: int = 4, depth: int = 8, *, buffers: int = 32, buffer_size: int = 1 << 20,
                 request_size: int = 256 << 10) -> None:
        self.socket = socket
        self.export = export
        self.contexts = tuple(contexts)
        self.counters = Counters()
        self._lock = threading.Lock()
        self._handles: list[nbd.NBD] = []
        self._wait: TcpWait | None = None       # the first handle's quick-ACK waits (TCP only)
        self._workers: list[_Connection] = []
        self._next = 0
        self._wanted = max(1, connections)
        self._depth = max(1, depth)
        self.size = 0
        self.multi_conn = False
        self.max_block = 0
        self.pool = BufferPool(max(1, buffers), buffer_size)
        self.request_size = max(1, min(request_size, buffer_size))

    def __enter__(self) -> NbdSource:
        self.open()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def open(self) -> None:
        early = self._start_readers() if isinstance(self.socket, TcpAddress) else None
        try:
            main = _open(self.socket, self.export, self.contexts)
        except BaseException:
            self._drop_early(early)
            raise
        self._handles.append(main)
        try:
            self.size = main.get_size()
            self.multi_conn = bool(main.can_multi_conn())
            self.max_block = int(main.get_block_size(nbd.SIZE_MAXIMUM) or 0)
            count = self._wanted if self.multi_conn else 1
            if early is None:
                self._handles.extend(_open(self.socket, self.export, ()) for _ in range(count))
            else:
                pending, early = early, None
                self._keep_readers(pending, count)
        except nbd.Error as err:
            self._drop_early(early)
            self.close()
            raise errors.NbdError(export=self.export, reason=_nbd_reason(err)) from err
        except errors.VirtnbdError:
            self._drop_early(early)
            self.close()
            raise
        # the first handle answers block status in the caller's thread; the others read
        # (a libnbd handle serialises its commands, and reading a read-only export from
        # a second connection is safe even without multi-conn)
        for h in self._handles[1:]:
            worker = _Connection(h, self.export, self._depth, counters=self.counters, lock=self._lock, pool=self.pool,
                                 request_size=self.request_size)
            worker.start()
            self._workers.append(worker)
        log.debug("nbd %s: size %d, multi-conn %s, %d reader connection(s), depth %d",
                  self.export, self.size, self.multi_conn, len(self._workers), self._depth)

    def _start_readers(self) -> tuple[ThreadPoolExecutor, list[Future[nbd.NBD]]]:
        """Over TCP the reader connections are made while the first one is (each TLS handshake is a
        round trip or more); those beyond one are closed again if the server does not allow multi-conn."""
        pool = ThreadPoolExecutor(self._wanted, thread_name_prefix="nbd-connect")
        return pool, [pool.submit(_open, self.socket, self.export, ()) for _ in range(self._wanted)]

    def _drop_early(self, early: tuple[ThreadPoolExecutor, list[Future[nbd.NBD]]] | None) -> None:
        """Close early reader connections not yet kept (the run failed before)."""
        if early is not None:
            with contextlib.suppress(errors.NbdError):
                self._keep_readers(early, 0)

    def _keep_readers(self, early: tuple[ThreadPoolExecutor, list[Future[nbd.NBD]]], count: int) -> None:
        """Keep ``count`` of the early reader connections, close the others; the first failure is raised
        when fewer than ``count`` connected."""
        pool, futures = early
        pool.shutdown(wait=True)
        failure: errors.NbdError | None = None
        kept = 0
        for fut in futures:
            try:
                h = fut.result()
            except errors.NbdError as err:
                failure = failure or err
                continue
            if kept < count:
                self._handles.append(h)
                kept += 1
            else:
                with contextlib.suppress(nbd.Error):
                    h.shutdown()
        if failure is not None and kept < count:
            raise failure

    def block_status(self, offset: int, count: int) -> Mapping[str, Sequence[tuple[int, int]]]:
        """{context: [(length, flags), ...]} from ``offset``; see :mod:`virtnbd.source.extents`."""
        answer: dict[str, list[tuple[int, int]]] = {}

        def callback(ctx: str, _off: int, entries: list[int], _err: object) -> int:
            answer.setdefault(ctx, []).extend(zip(entries[0::2], entries[1::2], strict=True))
            return 0

        try:
            with self._lock:
                self.counters.status_queries += 1
            if isinstance(self.socket, TcpAddress):
                self._tcp_block_status(count, offset, callback)
            else:
                self._handles[0].block_status(count, offset, callback)
        except nbd.Error as err:
            raise errors.NbdError(export=self.export,
                                  reason=f"block status at offset {offset} failed: {_nbd_reason(err)}") from err
        return answer

    def _tcp_block_status(self, count: int, offset: int, callback: Callable[..., int]) -> None:
        """block_status with quick ACKs: a multi-chunk reply of QEMU < 8.0 costs no 40 ms stall (see tcpwait)."""
        h = self._handles[0]
        if self._wait is None:
            self._wait = TcpWait(h)
        cookie = h.aio_block_status(count, offset, callback)
        self._wait.until(lambda: bool(h.aio_command_completed(cookie)), STATUS_TIMEOUT, lambda: errors.NbdError(
            export=self.export, reason=f"block status at offset {offset}: no answer in {STATUS_TIMEOUT:.0f}s"))

    def read(self, offset: int, length: int) -> Future[Chunk]:
        """Start reading (at most ``buffer_size`` bytes); the future yields a Chunk (or raises NbdError)."""
        if not 0 < length <= self.pool.size:
            raise errors.NbdError(export=self.export, reason=f"read of {length} bytes: outside 1..{self.pool.size}")
        worker = self._workers[self._next]
        self._next = (self._next + 1) % len(self._workers)
        return worker.submit(offset, length)

    def pread(self, offset: int, length: int) -> bytes:
        chunk = self.read(offset, length).result()
        try:
            return bytes(chunk.data)
        finally:
            chunk.release()

    def close(self) -> None:
        for worker in self._workers:
            worker.stop()
        for worker in self._workers:
            worker.join()
        self._workers.clear()
        if self._wait is not None:
            self._wait.close()
            self._wait = None
        for h in self._handles:
            with contextlib.suppress(nbd.Error):
                h.shutdown()
        self._handles.clear()     # the last reference going away closes each handle
