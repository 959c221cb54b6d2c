"""Backup sets in S3-compatible object storage (Ceph RGW, MinIO, AWS).

The only module that talks to boto3. A set at ``s3://BUCKET/PREFIX`` keeps the
same object names below ``PREFIX/`` as a folder keeps files (docs/FORMAT.md).

- :class:`Upload` streams one object as a multipart upload: parts of
  ``part_size`` bytes, at most ``concurrency`` in flight (memory is bounded by
  ``(concurrency + 1) * part_size``), each with its Content-MD5. Nothing is
  visible until :meth:`Upload.commit`; :meth:`Upload.abort` (also on error)
  removes the parts.
- :class:`RangedObject` answers ``pread(offset, length)`` with ranged GETs and is
  a seekable, read-only file object for sequential readers.
- :meth:`S3Store.lock` is a lock object created with ``If-None-Match: *``
  (exactly one writer wins on stores that honour it) holding owner and expiry.
- Every boto3 error becomes one :class:`errors.StorageError` line naming the
  object and the cause (wrong credentials, missing bucket, endpoint down, timeout).
"""
from __future__ import annotations

import atexit
import base64
import contextlib
import hashlib
import io
import json
import logging
import os
import queue
import socket
import sys
import tempfile
import threading
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, BinaryIO, cast

from virtnbd import errors
from virtnbd.backupset import naming, s3options
from virtnbd.backupset.s3options import S3Options

log = logging.getLogger(__name__)
Names = list[str]     # (the classes below have a method named list)

SCHEME = "s3://"
MIN_PART = 5 << 20            # S3 minimum (all parts but the last): memory (concurrency + 1) * part size
MAX_PARTS = 10_000
PARTS_PER_STEP = 1000       # part size doubles every 1000 parts (8 MiB parts: 8 GiB, then 16 MiB ...)
LOCK_NAME = naming.LOCKS[1]
BLOCK = 8 << 20              # ranged GETs of stream data: aligned 8 MiB blocks
CACHED_BLOCKS = 2            # per open object (16 MiB, + 8 MiB read ahead): readers move forward, workers share one
LOG_SPOOL = 4 << 20          # a run's log stays in memory up to this size, then in a temporary file
LOCK_TTL = 6 * 3600           # a lock older than this (owner gone quiet) may be broken


@dataclass(frozen=True)
class S3Url:
    bucket: str
    prefix: str                        # "" or "a/b" (no leading or trailing slash)

    @classmethod
    def parse(cls, url: str) -> S3Url:
        if not url.startswith(SCHEME):
            raise errors.UsageError(reason=f"{url}: not an s3:// URL")
        bucket, _, prefix = url[len(SCHEME):].partition("/")
        if not bucket:
            raise errors.UsageError(reason=f"{url}: no bucket in the URL (s3://BUCKET/PREFIX)")
        return cls(bucket, prefix.strip("/"))

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def __str__(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.prefix}" if self.prefix else f"{SCHEME}{self.bucket}"


def is_s3(location: str) -> bool:
    return location.startswith(SCHEME)


def part_size_for(expected: int) -> int:
    """Parts large enough that ``expected`` bytes fit in S3's 10 000 parts (MiB multiples)."""
    need = -(-max(expected, 1) // (MAX_PARTS - 100))
    return max(MIN_PART, -(-need // (1 << 20)) << 20)


_CLIENTS: dict[tuple[Any, ...], Any] = {}
_CLIENTS_LOCK = threading.Lock()


def make_client(options: S3Options) -> Any:
    """The process's client for ``options`` and the AWS_* environment it was built under.

    boto3 clients are thread-safe and building one costs about 0.1 s of CPU (endpoint and
    service model, event handlers): every store a command opens on the same endpoint (the set,
    its sub-prefixes, the key slot probe) shares one, and one request counter."""
    key = (options, tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_"))))
    with _CLIENTS_LOCK:
        found = _CLIENTS.get(key)
        if found is None:
            found = _CLIENTS[key] = _new_client(options)
        return found


def _new_client(options: S3Options) -> Any:
    _skip_pyopenssl()
    import boto3
    from botocore.config import Config

    for noisy in ("boto3", "botocore", "urllib3", "s3transfer"):   # their debug lines carry request headers
        logging.getLogger(noisy).setLevel(logging.WARNING)
    session = boto3.session.Session(profile_name=options.profile, region_name=options.region)
    # Every PUT and UploadPart carries a Content-MD5 (signed): no second, SHA-256 pass over each
    # payload for the signature (botocore skips it already over https; over http it would not).
    config = Config(connect_timeout=options.connect_timeout, read_timeout=options.read_timeout,
                    retries={"mode": "standard", "total_max_attempts": options.attempts},
                    max_pool_connections=max(10, 2 * options.concurrency),
                    s3={"payload_signing_enabled": False})
    # botocore < 1.31 does not read AWS_ENDPOINT_URL itself
    endpoint = options.endpoint or os.environ.get("AWS_ENDPOINT_URL") or None
    verify = options.ca_bundle if options.ca_bundle else None
    return session.client("s3", endpoint_url=endpoint, verify=verify, config=config)


def _skip_pyopenssl() -> None:
    """botocore (< 1.31, with urllib3 1.x) imports ``urllib3.contrib.pyopenssl`` only to take the
    standard library's SSLContext from it (``orig_util_SSLContext``); that import loads pyOpenSSL
    and cryptography's x509 (about 0.1 s of CPU per command). Unless something in this process
    imported it already, it is marked absent, and botocore takes the same class from
    ``urllib3.util.ssl_`` (its own ImportError fallback). TLS is the standard ``ssl`` module's
    either way: nothing here injects pyOpenSSL into urllib3."""
    sys.modules.setdefault("urllib3.contrib.pyopenssl", None)  # type: ignore[arg-type]


def describe(err: Exception, what: str, options: S3Options | None = None) -> errors.StorageError:
    """One line for a boto3/botocore error: the object and what to check."""
    from botocore import exceptions as bx

    if isinstance(err, bx.ClientError):
        code = str(err.response.get("Error", {}).get("Code", ""))
        return errors.StorageError(path=what, reason=_client_reason(code, err))
    if isinstance(err, bx.ReadTimeoutError | bx.ConnectTimeoutError | socket.timeout):
        limit = options.read_timeout if options else "?"
        reason = f"S3 request timed out ({limit} s): outcome unknown, not committed"
        return errors.StorageError(path=what, reason=reason)
    if isinstance(err, bx.EndpointConnectionError):
        url = urllib.parse.urlsplit(str(err.kwargs.get("endpoint_url", "")))
        return errors.StorageError(path=what, reason=f"S3 endpoint unreachable: {url.scheme}://{url.netloc} "
                                                     "does not answer; nothing committed")
    if isinstance(err, bx.NoCredentialsError | bx.ProfileNotFound):
        return errors.StorageError(path=what, reason=f"S3 credentials: {err} (environment, ~/.aws or --s3-profile)")
    return errors.StorageError(path=what, reason=f"S3: {err}")


_REASONS = {
    "SignatureDoesNotMatch": "access denied: the secret key does not match (AWS_SECRET_ACCESS_KEY / profile)",
    "InvalidAccessKeyId": "access denied: unknown access key (AWS_ACCESS_KEY_ID / profile)",
    "AccessDenied": "access denied: the credentials lack a permission (see README: IAM permissions)",
    "NoSuchBucket": "the bucket does not exist",
    "NoSuchKey": "no such object",
    "404": "no such object or bucket",
    "403": "access denied (credentials or permissions)",
    "PreconditionFailed": "exists already",
    "InvalidBucketName": "invalid bucket name",
}


def _client_reason(code: str, err: Exception) -> str:
    return _REASONS.get(code, f"S3 error {code}: {err}")


class S3Store:
    """Where a set's bytes live when its location is ``s3://BUCKET/PREFIX``."""

    def __init__(self, url: str | S3Url, options: S3Options | None = None, client: Any = None) -> None:
        self.url = url if isinstance(url, S3Url) else S3Url.parse(url)
        self.options = options or S3Options()
        self.location = str(self.url)
        self.client = client or make_client(self.options)
        self.requests = RequestCounter.of(self.client)

    def where(self, name: str) -> str:
        return f"{self.url}/{name}" if name else str(self.url)

    @contextlib.contextmanager
    def _call(self, name: str) -> Iterator[None]:
        from botocore import exceptions as bx

        try:
            yield
        except (TimeoutError, bx.BotoCoreError, bx.ClientError) as err:
            raise describe(err, self.where(name), self.options) from err

    def check_bucket(self) -> None:
        with self._call(""):
            # a GET, not HEAD: a HEAD error has no body, so no code to tell a wrong secret from a missing bucket
            self.client.list_objects_v2(Bucket=self.url.bucket, Prefix=self.url.key(""), MaxKeys=1)

    def size(self, name: str) -> int | None:
        from botocore import exceptions as bx

        try:
            head = self.client.head_object(Bucket=self.url.bucket, Key=self.url.key(name))
        except bx.ClientError as err:
            if str(err.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey"):
                return None
            raise describe(err, self.where(name), self.options) from err
        except bx.BotoCoreError as err:
            raise describe(err, self.where(name), self.options) from err
        return int(head["ContentLength"])

    def listing(self, sub: str = "") -> list[tuple[str, int]]:
        """(name relative to the prefix, size) of every object below ``sub``, sorted."""
        base = self.url.key(sub) if sub else (self.url.prefix + "/" if self.url.prefix else "")
        found = []
        with self._call(sub):
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.url.bucket, Prefix=base):
                for obj in page.get("Contents", []):
                    found.append((self._name(obj["Key"]), int(obj["Size"])))
        return sorted(found)

    def _name(self, key: str) -> str:
        return key[len(self.url.prefix) + 1:] if self.url.prefix else key

    def get(self, name: str) -> bytes:
        with self._call(name):
            body = self.client.get_object(Bucket=self.url.bucket, Key=self.url.key(name))["Body"]
            return bytes(body.read())

    def put(self, name: str, data: bytes | bytearray, *, if_absent: bool = False) -> None:
        """One atomic PUT (a reader sees the old or the new object, never a part)."""
        args = {"Bucket": self.url.bucket, "Key": self.url.key(name), "Body": data, "ContentMD5": _md5(data)}
        with self._call(name), _if_none_match(self.client, if_absent):
            self.client.put_object(**args)

    def remove_many(self, names: list[str]) -> None:
        for start in range(0, len(names), 1000):
            chunk = [{"Key": self.url.key(n)} for n in names[start:start + 1000]]
            with self._call(names[start]):
                out = self.client.delete_objects(Bucket=self.url.bucket, Delete={"Objects": chunk, "Quiet": True})
            if out.get("Errors"):
                first = out["Errors"][0]
                where = self.where(self._name(first["Key"]))
                raise errors.StorageError(path=where, reason=first.get("Message", "delete failed"))

    def open_ranged(self, name: str) -> RangedObject:
        size = self.size(name)
        if size is None:
            raise errors.StorageError(path=self.where(name), reason="no such object")
        return RangedObject(self, name, size)

    def upload(self, name: str, expected_size: int = 0) -> Upload:
        return Upload(self, name, part_size_for(expected_size), self.options.concurrency)

    def uploads(self) -> list[tuple[str, str, float]]:
        """(name, upload id, start time) of every multipart upload in progress below the prefix."""
        prefix = self.url.prefix + "/" if self.url.prefix else ""
        found = []
        with self._call(""):
            for page in self.client.get_paginator("list_multipart_uploads").paginate(
                    Bucket=self.url.bucket, Prefix=prefix):
                for up in page.get("Uploads", []):
                    found.append((self._name(up["Key"]), up["UploadId"], up["Initiated"].timestamp()))
        return found

    def abort_stale_uploads(self) -> list[str]:
        """Abort the uploads a killed run left behind (call with the lock held: none is ours)."""
        aborted = []
        for name, upload_id, _started in self.uploads():
            with self._call(name):
                self.client.abort_multipart_upload(Bucket=self.url.bucket, Key=self.url.key(name), UploadId=upload_id)
            log.info("%s: aborted an upload a previous run left behind", self.where(name))
            aborted.append(name)
        return aborted

    @contextlib.contextmanager
    def lock(self, reason: str = "backup") -> Iterator[None]:
        """Refuse a second run on this prefix: a lock object only one writer can create."""
        record = {"pid": os.getpid(), "host": socket.gethostname(), "reason": reason,
                  "expires": time.time() + LOCK_TTL}
        self._take_lock(json.dumps(record).encode())
        try:
            yield
        finally:
            with contextlib.suppress(errors.StorageError):
                self.remove_many([LOCK_NAME])

    def _take_lock(self, data: bytes) -> None:
        try:
            self.put(LOCK_NAME, data, if_absent=True)
            return
        except errors.StorageError as err:
            if "exists already" not in str(err):
                raise
        holder = self._lock_holder()
        if holder.get("expires", 0) > time.time() and not _holder_gone(holder):
            raise errors.LockedError(path=str(self.url), pid=holder.get("pid", "?"),
                                     reason=f"on {holder.get('host', '?')}: {holder.get('reason', '')}")
        log.warning("%s: breaking an expired lock of pid %s on %s", self.url, holder.get("pid"), holder.get("host"))
        self.remove_many([LOCK_NAME])
        self.put(LOCK_NAME, data, if_absent=True)

    def _lock_holder(self) -> dict[str, Any]:
        try:
            found = json.loads(self.get(LOCK_NAME))
        except (errors.StorageError, ValueError):
            return {}
        return found if isinstance(found, dict) else {}


def _holder_gone(holder: dict[str, Any]) -> bool:
    """The lock's owner ran on this host and its process is gone (a killed run): the lock is stale."""
    pid = holder.get("pid")
    if holder.get("host") != socket.gethostname() or not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _md5(data: bytes | bytearray | memoryview) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode()  # noqa: S324 - S3 Content-MD5, not security


@contextlib.contextmanager
def _if_none_match(client: Any, on: bool) -> Iterator[None]:
    """``If-None-Match: *`` on this thread's PutObject (boto3 1.26 has no parameter for it)."""
    if not on:
        yield
        return
    me = threading.get_ident()

    def add_header(request: Any, **_: Any) -> None:
        if threading.get_ident() == me:
            request.headers["If-None-Match"] = "*"

    client.meta.events.register("before-sign.s3.PutObject", add_header)
    try:
        yield
    finally:
        client.meta.events.unregister("before-sign.s3.PutObject", add_header)


class RequestCounter:
    """Counts the requests of one client, by operation (the figures in README; logged at exit with -v)."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self._lock = threading.Lock()

    @classmethod
    def of(cls, client: Any) -> RequestCounter:
        """The counter of ``client`` (one per client: the stores of sub-prefixes share it)."""
        found = getattr(client, "_virtnbd_requests", None)
        if isinstance(found, RequestCounter):
            return found
        counter = cls()
        client.meta.events.register("before-call.s3", counter._count)
        client._virtnbd_requests = counter
        atexit.register(counter.log)
        return counter

    def log(self) -> None:
        if self.counts:
            each = ", ".join(f"{op} {n}" for op, n in sorted(self.counts.items()))
            log.debug("S3 requests: %d (%s)", sum(self.counts.values()), each)

    def _count(self, model: Any, **_: Any) -> None:
        with self._lock:
            self.counts[model.name] = self.counts.get(model.name, 0) + 1


class Upload:
    """One object written as a multipart upload: write() in order, then commit() or abort().

    Parts are filled in place in ``concurrency + 1`` reused buffers and sent as they are
    (a ``bytearray`` body: botocore sends it with one ``sendall``; a ``bytes`` body it would
    first copy behind the request's headers). A buffer comes back when its part is stored,
    so ``write`` blocks while every buffer is in flight: memory stays at the buffers.
    """

    def __init__(self, store: S3Store, name: str, part_size: int, concurrency: int) -> None:
        self.store, self.name, self.part_size = store, name, part_size
        workers = max(1, concurrency)
        self._free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        self._spare = workers + 1                  # buffers not yet allocated
        self._buf: bytearray | None = None
        self._fill = 0
        self._parts: list[Future[dict[str, Any]]] = []
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="s3-put")
        self._id: str | None = None
        self.size = 0

    def __enter__(self) -> Upload:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is not None:
            self.abort()

    def _start(self) -> str:
        if self._id is None:
            with self.store._call(self.name):
                out = self.store.client.create_multipart_upload(Bucket=self.store.url.bucket,
                                                                Key=self.store.url.key(self.name))
            self._id = str(out["UploadId"])
        return self._id

    def _take(self) -> bytearray:
        """A part buffer of ``part_size`` bytes: a returned one, a new one, or wait for one."""
        while True:
            if self._spare:
                self._spare -= 1
                return bytearray(self.part_size)
            buf = self._free.get()
            self._raise_failed()
            if len(buf) == self.part_size:
                return buf
            self._spare += 1                        # the part size grew (or a shrunk last part): reallocate

    def write(self, data: bytes | memoryview) -> int:
        """Copy into the current part buffer (the only copy); a full part goes out as it is."""
        view = memoryview(data).cast("B")
        self.size += len(view)
        while view:
            if self._buf is None:
                self._buf, self._fill = self._take(), 0
            take = min(len(view), len(self._buf) - self._fill)
            self._buf[self._fill:self._fill + take] = view[:take]
            self._fill += take
            view = view[take:]
            if self._fill == len(self._buf):
                self._send(self._buf)
                self._buf = None
                if len(self._parts) % PARTS_PER_STEP == 0:   # unknown final size: grow so 10 000 parts reach TiBs
                    self.part_size *= 2
        return len(data)

    def flush(self) -> None:
        """Parts go out as they fill; the tail waits for commit()."""

    def _send(self, part: bytearray) -> None:
        upload_id = self._start()
        number = len(self._parts) + 1
        self._raise_failed()
        future = self._pool.submit(self._put_part, upload_id, number, part)
        future.add_done_callback(lambda _f: self._free.put(part))
        self._parts.append(future)

    def _put_part(self, upload_id: str, number: int, part: bytearray) -> dict[str, Any]:
        s = self.store
        with s._call(self.name):
            out = s.client.upload_part(Bucket=s.url.bucket, Key=s.url.key(self.name), UploadId=upload_id,
                                       PartNumber=number, Body=part, ContentMD5=_md5(part))
        return {"PartNumber": number, "ETag": out["ETag"]}

    def _raise_failed(self) -> None:
        for f in self._parts:
            if f.done() and f.exception() is not None:
                raise f.exception()  # type: ignore[misc]

    def _tail(self) -> bytearray:
        """The last, partly filled part, cut to its length in place."""
        buf = self._buf if self._buf is not None else bytearray()
        del buf[self._fill:]
        self._buf = None
        return buf

    def commit(self) -> None:
        """Make the object visible: all parts uploaded and checked, then one Complete call."""
        if self._id is None:                   # small object: one PUT
            self.store.put(self.name, self._tail())
            self._pool.shutdown()
            return
        if self._fill and self._buf is not None:
            self._send(self._tail())
        parts = [f.result() for f in self._parts]
        s = self.store
        with s._call(self.name):
            s.client.complete_multipart_upload(Bucket=s.url.bucket, Key=s.url.key(self.name), UploadId=self._id,
                                               MultipartUpload={"Parts": parts})
        self._pool.shutdown()

    def abort(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self._id is not None:
            s = self.store
            with contextlib.suppress(errors.StorageError), s._call(self.name):
                s.client.abort_multipart_upload(Bucket=s.url.bucket, Key=s.url.key(self.name), UploadId=self._id)
            self._id = None


class RangedObject(io.RawIOBase):
    """A read-only, seekable view of one object; ``pread`` is thread-safe (one ranged GET)."""

    def __init__(self, store: S3Store, name: str, size: int) -> None:
        super().__init__()
        self.store, self.name, self.length = store, name, size
        self._pos = 0
        self._lock = threading.Lock()
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._loading: dict[int, Future[bytes]] = {}

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.length}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def pread(self, length: int, offset: int) -> bytes:
        """Up to ``length`` bytes at ``offset`` (fewer only at the end), like os.pread.

        Small reads are served from aligned ``BLOCK`` sized ranged GETs kept in a tiny cache
        (readers go through a stream mostly in offset order: one GET per block, not per frame).
        """
        end = min(offset + length, self.length)
        if end <= offset:
            return b""
        first, last = offset // BLOCK, (end - 1) // BLOCK
        if last - first > 1:
            return self._get(offset, end)
        start = offset - first * BLOCK
        head = self._block(first)
        if first == last:
            return head if (start, end - offset) == (0, len(head)) else head[start:start + end - offset]
        tail = self._block(last)     # across a block boundary: copy the wanted bytes only, not both blocks
        return b"".join((memoryview(head)[start:], memoryview(tail)[:end - last * BLOCK]))

    def _block(self, index: int) -> bytes:
        """Block ``index`` (cached, being loaded, or loaded now); a reader going forward block by
        block has the next one loaded in the background meanwhile (one GET ahead, not more)."""
        with self._lock:
            data = self._cache.get(index)
            if data is not None:
                self._cache.move_to_end(index)
                waiter, mine = None, False
            else:
                waiter, mine = self._claim(index)
            ahead = (index == 0 or index - 1 in self._cache) and (index + 1) * BLOCK < self.length
        if ahead:
            self._prefetch(index + 1)
        if waiter is None:
            return cast(bytes, data)
        return self._load(index, waiter) if mine else waiter.result()

    def _claim(self, index: int) -> tuple[Future[bytes], bool]:
        """(the future of block ``index``, True when the caller loads it); under the lock."""
        waiter = self._loading.get(index)
        if waiter is not None:
            return waiter, False
        waiter = self._loading[index] = Future()
        return waiter, True

    def _prefetch(self, index: int) -> None:
        with self._lock:
            if index in self._cache or index in self._loading:
                return
            waiter = self._loading[index] = Future()
        threading.Thread(target=self._load_ahead, args=(index, waiter), name="s3-ahead", daemon=True).start()

    def _load_ahead(self, index: int, waiter: Future[bytes]) -> None:
        with contextlib.suppress(errors.StorageError):     # a reader of the block gets it from the future
            self._load(index, waiter)

    def _load(self, index: int, waiter: Future[bytes]) -> bytes:
        try:
            data = self._get(index * BLOCK, min((index + 1) * BLOCK, self.length))
        except BaseException as err:
            waiter.set_exception(err)
            with self._lock:
                del self._loading[index]
            raise
        with self._lock:
            self._cache[index] = data
            del self._loading[index]
            while len(self._cache) > CACHED_BLOCKS:
                self._cache.popitem(last=False)
        waiter.set_result(data)
        return data

    def _get(self, offset: int, end: int) -> bytes:
        s = self.store
        with s._call(self.name):
            body = s.client.get_object(Bucket=s.url.bucket, Key=s.url.key(self.name),
                                       Range=f"bytes={offset}-{end - 1}")["Body"]
            data = bytes(body.read())
        if len(data) != end - offset:
            raise errors.StorageError(path=s.where(self.name), reason=f"short ranged read at {offset}")
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.pread(len(buffer), self._pos)
        buffer[:len(data)] = data
        self._pos += len(data)
        return len(data)


class BufferedObject(io.BufferedReader):
    """Sequential reads (served from the raw object's cached blocks: one GET per block), plus its thread-safe pread."""

    def __init__(self, raw: RangedObject, buffer_size: int = 1 << 20) -> None:
        super().__init__(raw, buffer_size)

    def pread(self, length: int, offset: int) -> bytes:
        return self.raw.pread(length, offset)  # type: ignore[attr-defined, no-any-return]


class ObjectStore(S3Store):
    """The :class:`~virtnbd.backupset.store.Store` of a set at ``s3://BUCKET/PREFIX``."""

    def exists(self) -> bool:
        """The prefix holds objects (a set or a root of sets)."""
        with self._call(""):
            out = self.client.list_objects_v2(Bucket=self.url.bucket, Prefix=self.url.key(""), MaxKeys=1)
        return bool(out.get("KeyCount"))

    def prepare(self) -> None:
        self.check_bucket()

    def describe(self, name: str) -> str:
        return self.where(name)

    def open_read(self, name: str) -> BinaryIO:
        return cast(BinaryIO, BufferedObject(self.open_ranged(name)))

    def pread(self, name: str, offset: int, length: int) -> bytes:
        return self.open_ranged(name).pread(length, offset)

    def read_bytes(self, name: str) -> bytes | None:
        """The whole object, or None when there is none (one GET, no HEAD first)."""
        from botocore import exceptions as bx

        try:
            return self.get(name)
        except errors.StorageError as err:
            cause = err.__cause__
            if isinstance(cause, bx.ClientError) and str(cause.response.get("Error", {}).get("Code")) in (
                    "404", "NoSuchKey"):
                return None
            raise

    @contextlib.contextmanager
    def create(self, name: str, staging_blocks: int = 0) -> Iterator[BinaryIO]:
        """A multipart upload, completed when the block exits cleanly and aborted otherwise."""
        with self.upload(name) as up:
            yield cast(BinaryIO, up)
            up.commit()

    def replace(self, name: str, data: bytes) -> None:
        self.put(name, data)

    def list(self) -> list[str]:  # type: ignore[override]
        return [name for name, _ in self.listing() if "/" not in name]

    def remove(self, name: str) -> None:
        self.remove_many([name])

    def recover(self) -> Names:
        """Finish moves of old chains; abort the multipart uploads a killed run left (never an object)."""
        moved = [self._finish_move(m[1:-len(naming.MOVING)]) for m in self.list()
                 if m.startswith(f".{naming.ARCHIVE_PREFIX}") and m.endswith(naming.MOVING)]
        return moved + self.abort_stale_uploads()

    def archive(self, name: str) -> None:
        """Move the chain under ``name/``: a marker object, server-side copies (the manifest last),
        then deletions (the manifest first), then the marker goes; :meth:`recover` redoes what is left."""
        self.put(f".{name}{naming.MOVING}", b"")
        self._finish_move(name)

    def _finish_move(self, name: str) -> str:
        names = [n for n, _ in self.listing() if not naming.stays(n.partition("/")[0])]
        if naming.MANIFEST in names:         # copies not all done yet (the manifest goes last)
            for n in sorted(names, key=lambda n: n == naming.MANIFEST):
                self.copy(n, f"{name}/{n}")
            self.remove_many([naming.MANIFEST])
        rest = [n for n in names if n != naming.MANIFEST]
        if rest:
            self.remove_many(rest)
        self.remove_many([f".{name}{naming.MOVING}"])
        log.info("%s: chain moved into %s", self.url, self.where(name))
        return name

    @contextlib.contextmanager
    def open_log(self, name: str) -> Iterator[BinaryIO]:
        """Kept in a spooled buffer, uploaded when the block exits (also on error; best effort)."""
        with tempfile.SpooledTemporaryFile(max_size=LOG_SPOOL) as buf:
            try:
                yield cast(BinaryIO, buf)
            finally:
                buf.seek(0)
                with contextlib.suppress(errors.StorageError):
                    self.put(name, buf.read())

    def set_modes(self, umask: int | None) -> None:
        """Objects have no file modes (access is the bucket policy's)."""

    def sub(self, name: str) -> ObjectStore:
        return ObjectStore(S3Url(self.url.bucket, self.url.key(name)), self.options, client=self.client)

    def folders(self) -> Names:
        base = self.url.prefix + "/" if self.url.prefix else ""
        found = []
        with self._call(""):
            for page in self.client.get_paginator("list_objects_v2").paginate(
                    Bucket=self.url.bucket, Prefix=base, Delimiter="/"):
                found += [p["Prefix"][len(base):].rstrip("/") for p in page.get("CommonPrefixes", [])]
        return sorted(found)

    def remove_tree(self, name: str) -> None:
        names = [n for n, _ in self.listing(name + "/")]
        if names:
            self.remove_many(names)

    def copy(self, name: str, target: str) -> None:
        """Server-side copy of one object (managed: multipart copy above 5 GiB)."""
        with self._call(name):
            self.client.copy({"Bucket": self.url.bucket, "Key": self.url.key(name)}, self.url.bucket,
                             self.url.key(target))


def open_object_store(location: str) -> ObjectStore:
    return ObjectStore(location, s3options.configured())
