"""nbdkit python plugin serving one disk of a backup set at one point (run by ``virtnbdmap``).

nbdkit loads this file into its embedded Debian Python 3.11, not into our
venv: ``path=`` (os.pathsep separated) lists the ``sys.path`` entries of the
``virtnbdmap`` process, added before virtnbd is imported. Keys: ``set=``,
``until=``, ``disk=``, ``path=``, and for an encrypted set ``key_file=`` or
``passphrase_file=`` (file names; ``VIRTNBD_PASSPHRASE`` comes through the
environment nbdkit inherits, never argv). The set is opened in
``config_complete``, so a bad set or key stops nbdkit before it listens.
"""
import errno
import sys

import nbdkit  # type: ignore[import-not-found]  # provided by nbdkit's embedded interpreter

API_VERSION = 2
_config: dict = {}
_state: dict = {}


def config(key, value):
    if key not in ("set", "until", "disk", "path", "key_file", "passphrase_file"):
        raise RuntimeError(f"unknown parameter {key}")
    _config[key] = value


def config_complete():
    for entry in reversed(_config.get("path", "").split(":")):
        if entry and entry not in sys.path:
            sys.path.insert(0, entry)
    from virtnbd import errors
    from virtnbd.access.pointreader import open_point
    from virtnbd.backupset import encrypted
    from virtnbd.crypto import keysource
    if "set" not in _config:
        raise RuntimeError("set= is required")
    _state["errors"] = errors
    try:
        spec = keysource.spec_from(_config.get("key_file"), _config.get("passphrase_file"))
        encrypted.use_for(_config["set"], spec)
        _state["reader"] = open_point(_config["set"], _config.get("until") or None, _config.get("disk") or None)
        _state["preferred"] = _state["reader"].preferred_block_size()
    except errors.VirtnbdError as err:
        raise RuntimeError(f"virtnbdmap: {err}") from None


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


def open(readonly):  # noqa: A001 - nbdkit's callback name
    return _state["reader"]


def get_size(h):
    return h.size


def can_write(h):
    return False


def can_multi_conn(h):
    return True


def can_cache(h):
    return nbdkit.CACHE_NONE


def block_size(h):
    """Preferred request size = a frame: nbdcopy then reads whole frames straight into its buffer."""
    return 1, _state["preferred"], 0xFFFFFFFF


def pread(h, buf, offset, flags):
    try:
        h.readinto(offset, buf)
    except _state["errors"].VirtnbdError as err:
        nbdkit.set_error(errno.EIO)
        raise RuntimeError(f"virtnbdmap: read {offset}+{len(buf)}: {err}") from None


def can_extents(h):
    return True


_FLAGS = {"data": 0, "zero": nbdkit.EXTENT_ZERO, "hole": nbdkit.EXTENT_HOLE | nbdkit.EXTENT_ZERO}


def extents(h, count, offset, flags):
    return [(start, length, _FLAGS[kind]) for start, length, kind in h.extents(offset, count)]
