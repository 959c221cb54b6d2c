"""RBD image target: restore straight into a Ceph RBD image through librbd.

- A new image is created under ``<image>.partial`` with the disk's virtual
  size (and the optional features / object size), written, flushed, then
  renamed to its final name in :meth:`RbdTarget.commit`: nothing that looks
  complete exists before the last byte is on the cluster. ``abort`` removes it.
- An existing image is refused unless ``overwrite`` is set; with it the image
  (which must not be in use: no watchers) is renamed to ``<image>.partial``,
  resized to the virtual size, written in place and renamed back at commit.
  On a new image zero ranges are skipped (it reads zero: thin); on an existing
  one they become ``write_zeroes`` (deallocates whole objects, zero-fills the rest).
  If a failed overwrite had already written, the image is left as ``.partial``.
- Writes are ``aio_write`` with up to ``MAX_IN_FLIGHT`` requests in flight,
  whatever the number of calling threads; errors of completions surface on
  the next call or at ``commit``.
- Optionally a snapshot named after the restored point is taken at commit.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from virtnbd import errors, rbdconn
from virtnbd.fsutil import PARTIAL_SUFFIX
from virtnbd.restore.targets.base import TargetBase, TargetRequest

log = logging.getLogger(__name__)

CHUNK = 4 << 20               # split writes at this size (librbd's default object size)
MAX_IN_FLIGHT = 16
# Client settings for a restore: buffers are kept alive until their write completes, so librbd
# may use them without copying; no write-back cache (it would only add a copy and a dirty limit).
TUNING = {"rbd_disable_zero_copy_writes": "false", "rbd_cache": "false"}

FEATURES = {
    "layering": "RBD_FEATURE_LAYERING",
    "striping": "RBD_FEATURE_STRIPINGV2",
    "exclusive-lock": "RBD_FEATURE_EXCLUSIVE_LOCK",
    "object-map": "RBD_FEATURE_OBJECT_MAP",
    "fast-diff": "RBD_FEATURE_FAST_DIFF",
    "deep-flatten": "RBD_FEATURE_DEEP_FLATTEN",
    "journaling": "RBD_FEATURE_JOURNALING",
}


@dataclass(frozen=True)
class RbdOptions:
    """What the restore command's options say about RBD targets."""

    ceph: rbdconn.CephOptions = rbdconn.CephOptions()
    features: tuple[str, ...] | None = None      # None: the cluster's rbd_default_features
    object_size: int | None = None               # bytes, power of two; None: cluster default
    overwrite: bool = False
    snapshot: bool = False                       # snapshot named after the restored point at commit


def parse_features(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in FEATURES]
    if unknown:
        raise errors.UsageError(reason=f"unknown RBD feature(s) {', '.join(unknown)} (known: {', '.join(FEATURES)})")
    return names


def parse_object_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    raw = text.strip().upper().removesuffix("B").removesuffix("I")
    try:
        value = int(raw[:-1]) * units[raw[-1]] if raw and raw[-1] in units else int(raw)
    except ValueError:
        value = 0
    if value < 4096 or value > (1 << 30) or value & (value - 1):
        raise errors.UsageError(reason=f"--rbd-object-size {text}: a power of two between 4K and 1G")
    return value


def feature_mask(rbd: Any, names: tuple[str, ...]) -> int:
    mask = 0
    for name in names:
        mask |= int(getattr(rbd, FEATURES[name]))
    return mask


def rbd_options(extra: Mapping[str, Any]) -> RbdOptions:
    value = extra.get("rbd", RbdOptions())
    if not isinstance(value, RbdOptions):
        raise TypeError("TargetRequest.extra['rbd'] must be an RbdOptions")
    return value


class RbdTarget(TargetBase):
    def __init__(self, request: TargetRequest) -> None:
        import rados
        import rbd

        self._rbd, self._rados = rbd, rados
        self.spec = rbdconn.parse_spec(request.spec)
        self.name = str(self.spec)
        self.tmp = self.spec.image + PARTIAL_SUFFIX
        self.options = rbd_options(request.extra)
        self.point: str | None = request.extra.get("point")
        self.virtual_size = request.virtual_size
        self.bytes_written = 0
        self.zero_bytes = 0
        self._cond = threading.Condition()
        self._in_flight = 0
        self._pending: dict[object, bytes | None] = {}
        self._failure: str | None = None
        self._image: Any = None
        self._touched = False
        self._existing = False
        self._own_tmp = False          # the .partial image is ours to remove / rename
        self._closed = False
        self._stack = contextlib.ExitStack()
        try:
            cluster = self._stack.enter_context(rbdconn.connect(self.options.ceph, TUNING))
            self._ioctx = self._stack.enter_context(rbdconn.open_pool(cluster, self.spec.pool, self.options.ceph))
            self._prepare()
        except BaseException:
            self.abort()
            raise

    # -- set-up ----------------------------------------------------------
    def _fail(self, reason: str) -> errors.CephError:
        return errors.CephError(reason=f"{self.name}: {reason}")

    def _exists(self, name: str) -> bool:
        try:
            with self._rbd.Image(self._ioctx, name, read_only=True):
                return True
        except self._rbd.ImageNotFound:
            return False
        except self._rbd.Error as err:
            raise rbdconn.describe(err, self.options.ceph, f"{self.name}: opening {name}") from err

    def _watchers(self, name: str) -> int:
        with self._rbd.Image(self._ioctx, name, read_only=True) as image:
            return len(list(image.watchers_list()))

    def _prepare(self) -> None:
        self._existing = self._exists(self.spec.image)
        if self._existing and not self.options.overwrite:
            raise self._fail("image exists already (use --overwrite to restore into it)")
        if self.options.snapshot and not self.point:
            raise self._fail("--rbd-snapshot needs the name of the restored point")
        try:
            if self._exists(self.tmp):
                if self._watchers(self.tmp):
                    raise self._fail(f"{self.tmp} is in use (another restore running?)")
                log.warning("%s: removing %s left by an interrupted restore", self.name, self.tmp)
                self._rbd.RBD().remove(self._ioctx, self.tmp)
            # ours from here on: a signal between create/rename and the next line must not leak it
            self._own_tmp = True
            if self._existing:
                self._take_existing()
            else:
                self._create()
            self._image = self._rbd.Image(self._ioctx, self.tmp)
            if self._existing and self._image.size() != self.virtual_size:
                self._image.resize(self.virtual_size)
        except self._rbd.Error as err:
            raise rbdconn.describe(err, self.options.ceph, f"{self.name}: preparing") from err

    def _create(self) -> None:
        kwargs: dict[str, Any] = {"old_format": False}
        if self.options.features is not None:
            kwargs["features"] = feature_mask(self._rbd, self.options.features)
        if self.options.object_size is not None:
            kwargs["order"] = self.options.object_size.bit_length() - 1
        try:
            self._rbd.RBD().create(self._ioctx, self.tmp, self.virtual_size, **kwargs)
        except self._rbd.InvalidArgument as err:
            raise self._fail(f"cannot create image with these options: {err}") from err

    def _take_existing(self) -> None:
        if self._watchers(self.spec.image):
            raise self._fail("image is in use (it has watchers: a running domain?); refusing to overwrite")
        if self.options.snapshot:
            with self._rbd.Image(self._ioctx, self.spec.image, read_only=True) as image:
                if any(s["name"] == self.point for s in image.list_snaps()):
                    raise self._fail(f"snapshot {self.point} exists already")
        self._rbd.RBD().rename(self._ioctx, self.spec.image, self.tmp)

    # -- aio bookkeeping -----------------------------------------------------
    def _submit(self, start: Any, keep: bytes | None) -> None:
        """Start one aio request (``start(callback)``); block while MAX_IN_FLIGHT are running."""
        token = object()
        with self._cond:
            while self._in_flight >= MAX_IN_FLIGHT and self._failure is None:
                self._cond.wait()
            if self._failure is not None:
                raise errors.CephError(reason=self._failure)
            self._in_flight += 1
            self._pending[token] = keep          # the buffer stays alive until librbd is done
            self._touched = True

        def done(comp: Any) -> None:
            rc = comp.get_return_value()
            self._finish(token, rc if rc < 0 else None)

        try:
            start(done)
        except self._rbd.Error as err:
            self._finish(token, None)
            raise rbdconn.describe(err, self.options.ceph, f"{self.name}: writing") from err

    def _finish(self, token: object, rc: int | None) -> None:
        with self._cond:
            self._in_flight -= 1
            self._pending.pop(token, None)
            if rc is not None and self._failure is None:
                code = -rc
                what = "the cluster is full" if code in (errno.ENOSPC, errno.EDQUOT) else (
                    "request timed out" if code == errno.ETIMEDOUT else f"I/O error {errno.errorcode.get(code, code)}")
                self._failure = f"{self.name}: write failed: {what}"
            self._cond.notify_all()

    def _drain(self) -> None:
        with self._cond:
            while self._in_flight:
                self._cond.wait()

    # -- Target --------------------------------------------------------------
    def write(self, offset: int, data: bytes | memoryview) -> None:
        if self._image is None:
            raise self._fail("write after close")
        view = memoryview(data)
        whole = _whole_bytes(data)
        for pos in range(0, len(view), CHUNK):
            # librbd's binding takes bytes: pass the caller's object when it is one, else copy
            piece = whole if whole is not None and len(view) <= CHUNK else bytes(view[pos:pos + CHUNK])
            at = offset + pos
            self._submit(lambda cb, p=piece, o=at: self._image.aio_write(p, o, cb), piece)
        with self._cond:
            self.bytes_written += len(view)

    def zero(self, offset: int, length: int) -> None:
        if self._image is None:
            raise self._fail("zero after close")
        with self._cond:
            self.zero_bytes += length
        if self._existing:
            # Old data must go; write_zeroes deallocates whole objects, zero-fills partial ones.
            self._submit(lambda cb: self._image.aio_write_zeroes(offset, length, cb), None)

    def commit(self) -> None:
        if self._image is None:
            raise self._fail("commit after close")
        try:
            self._drain()
            if self._failure is not None:
                raise errors.CephError(reason=self._failure)
            self._image.flush()
            if self.options.snapshot:
                self._image.create_snap(self.point)
            self._image.close()
            self._image = None
            self._rbd.RBD().rename(self._ioctx, self.tmp, self.spec.image)
        except self._rbd.Error as err:
            self.abort()
            raise rbdconn.describe(err, self.options.ceph, f"{self.name}: finishing") from err
        except BaseException:
            self.abort()
            raise
        self._closed = True
        self._stack.close()
        log.debug("%s: %d bytes written, %d zero bytes", self.name, self.bytes_written, self.zero_bytes)

    def abort(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._drain()
            if self._image is not None:
                with contextlib.suppress(self._rbd.Error):
                    self._image.close()
                self._image = None
            self._discard_temp()
        finally:
            self._stack.close()

    def _discard_temp(self) -> None:
        if not self._own_tmp or not self._exists_quietly(self.tmp):
            return
        if not self._existing:
            with contextlib.suppress(self._rbd.Error):
                self._rbd.RBD().remove(self._ioctx, self.tmp)
        elif not self._touched:
            with contextlib.suppress(self._rbd.Error):
                self._rbd.RBD().rename(self._ioctx, self.tmp, self.spec.image)
        else:
            log.error("%s: restore failed after overwriting parts of the image; it is left as rbd:%s/%s",
                      self.name, self.spec.pool, self.tmp)

    def _exists_quietly(self, name: str) -> bool:
        try:
            return self._exists(name)
        except errors.CephError:
            return False


def _whole_bytes(data: bytes | memoryview) -> bytes | None:
    """``data`` as the bytes object it is or fully views (no copy), else None."""
    if isinstance(data, bytes):
        return data
    obj = data.obj
    if isinstance(obj, bytes) and data.c_contiguous and data.nbytes == len(obj) and data.format == "B":
        return obj
    return None


def open_rbd(request: TargetRequest) -> RbdTarget:
    return RbdTarget(request)


def explicit_targets(targets: tuple[tuple[str, str], ...], disks: list[str]) -> dict[str, str]:
    """``--target`` items -> {disk: spec} for the disks being restored."""
    found: dict[str, str] = {}
    for named, spec in targets:
        disk = named
        if not disk:
            if len(disks) != 1:
                raise errors.UsageError(reason=f"--target {spec} without DISK= but {len(disks)} disks are restored "
                                               f"({', '.join(disks)}): use -d DISK or --target DISK={spec}")
            disk = disks[0]
        elif disk not in disks:
            raise errors.UsageError(reason=f"--target {disk}=...: no disk {disk} is restored ({', '.join(disks)})")
        found[disk] = spec
    return found
