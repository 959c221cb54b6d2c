"""Connections to a Ceph cluster (librados/librbd through Debian's python3-rados/python3-rbd).

Shared by the RBD restore target and the RBD backup extent source. Every
connection has a timeout (an unreachable cluster or a full OSD becomes a
:class:`virtnbd.errors.CephError`, never a hang) and is always shut down.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from virtnbd import errors

log = logging.getLogger(__name__)

DEFAULT_CONF = "/etc/ceph/ceph.conf"
DEFAULT_ID = "admin"
_NAME = re.compile(r"^[A-Za-z0-9_.+-][A-Za-z0-9_.+@-]*$")


@dataclass(frozen=True)
class CephOptions:
    conf: str = DEFAULT_CONF
    client_id: str = DEFAULT_ID
    keyring: str | None = None          # None: /etc/ceph/ceph.client.<id>.keyring when it exists, else ceph.conf's
    connect_timeout: int = 30           # seconds to reach the monitors and authenticate
    op_timeout: int = 300               # seconds one OSD/monitor request may take
    mon_host: str | None = None         # monitors + key given directly (no config file is read then)
    key: str | None = None              # base64 cephx secret (from a libvirt secret)

    def keyring_path(self) -> str | None:
        if self.keyring is not None:
            return self.keyring
        default = f"/etc/ceph/ceph.client.{self.client_id}.keyring"
        return default if os.path.exists(default) else None


@dataclass(frozen=True)
class ImageSpec:
    pool: str
    image: str

    def __str__(self) -> str:
        return f"rbd:{self.pool}/{self.image}"


def parse_spec(spec: str) -> ImageSpec:
    """``rbd:POOL/IMAGE`` (the ``rbd:`` prefix is optional) -> :class:`ImageSpec`."""
    body = spec.removeprefix("rbd:")
    pool, sep, image = body.partition("/")
    if not sep or not pool or not image or not _NAME.match(pool) or not _NAME.match(image):
        raise errors.UsageError(reason=f"{spec}: expected rbd:POOL/IMAGE")
    return ImageSpec(pool, image)


def _check_readable(path: str, what: str, option: str) -> None:
    try:
        with open(path, "rb"):
            pass
    except OSError as err:
        raise errors.CephError(reason=f"{path}: cannot read {what} ({option}): {err.strerror}") from err


def describe(err: Exception, options: CephOptions, doing: str) -> errors.CephError:
    """One clear line for a librados/librbd exception."""
    code = getattr(err, "errno", None)
    if code is not None and code < 0:
        code = -code
    if code == errno.ETIMEDOUT:
        reason = f"{doing}: no answer from the cluster (monitors in {options.conf}) within the timeout"
    elif code in (errno.EACCES, errno.EPERM):
        reason = (f"{doing}: permission denied for client.{options.client_id} "
                  f"(wrong key or missing caps? keyring {options.keyring_path() or 'from ' + options.conf})")
    elif code in (errno.ENOSPC, errno.EDQUOT):
        reason = f"{doing}: the cluster is full"
    else:
        reason = f"{doing}: {err}"
    return errors.CephError(reason=reason)


def rados_conf(options: CephOptions) -> dict[str, str]:
    conf = {
        "client_mount_timeout": str(options.connect_timeout),
        "rados_mon_op_timeout": str(options.op_timeout),
        "rados_osd_op_timeout": str(options.op_timeout),
    }
    if options.mon_host is not None:
        conf["mon_host"] = options.mon_host
        if options.key is not None:
            conf["key"] = options.key
        return conf
    keyring = options.keyring_path()
    if keyring is not None:
        conf["keyring"] = keyring
    return conf


@contextlib.contextmanager
def connect(options: CephOptions, tuning: dict[str, str] | None = None) -> Iterator[Any]:
    """A connected ``rados.Rados`` (``tuning``: extra client settings); shut down on exit whatever happens."""
    try:
        import rados
    except ImportError as err:
        raise errors.CephError(reason="python3-rados is not installed") from err
    conffile: str | None = None
    if options.mon_host is None:
        _check_readable(options.conf, "Ceph config", "--ceph-conf")
        conffile = options.conf
        if options.keyring is not None:
            _check_readable(options.keyring, "keyring", "--ceph-keyring")
    try:
        cluster = rados.Rados(conffile=conffile, rados_id=options.client_id,
                              conf={**rados_conf(options), **(tuning or {})})
    except rados.Error as err:
        raise describe(err, options, f"reading {options.conf}") from err
    try:
        try:
            cluster.connect(timeout=options.connect_timeout)
        except rados.Error as err:
            raise describe(err, options, f"connecting as client.{options.client_id}") from err
        log.debug("connected to ceph cluster %s as client.%s", cluster.get_fsid(), options.client_id)
        yield cluster
    finally:
        cluster.shutdown()


@contextlib.contextmanager
def open_pool(cluster: Any, pool: str, options: CephOptions) -> Iterator[Any]:
    """An ``Ioctx`` for ``pool``; a missing pool is one clear error."""
    import rados

    try:
        ioctx = cluster.open_ioctx(pool)
    except rados.ObjectNotFound as err:
        raise errors.CephError(reason=f"pool '{pool}' does not exist") from err
    except rados.Error as err:
        raise describe(err, options, f"opening pool '{pool}'") from err
    try:
        yield ioctx
    finally:
        ioctx.close()
