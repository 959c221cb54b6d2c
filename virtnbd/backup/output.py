"""The backup folder side of a run: lock, log file, scratch/socket dir, saved side files.

Every side file written for a point (domain XML, checkpoint XML, qemu-img
info, firmware/kernel/TPM copies) is registered with the run so a failed run
removes it again; only the manifest commit makes a point real.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from virtnbd import errors, fsutil
from virtnbd.backupset.store import LOCK_FILE, LocalStore, Store, folder_lock
from virtnbd.secrets import RedactFilter

__all__ = ["LOCK_FILE", "folder_lock"]   # the folder lock lives with the local store
from virtnbd.remote import host
from virtnbd.virt.job import pid_alive

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
QEMU_USER_MODE = host.QEMU_USER_MODE


def prepare_folder(folder: str) -> Path:
    """Create the local backup folder (0700) and check it is writable."""
    LocalStore(folder).prepare()
    return Path(folder)


class _RunLogHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The run's log is best effort: a store that turns read-only or full must not
    print logging tracebacks or hide the run's own error line (stderr still has every message)."""

    failed = False

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging's name)
        self.failed = True


@contextlib.contextmanager
def run_log(store: Store, level: str, stamp: str) -> Iterator[str]:
    """A DEBUG log of this run in the set's store (``backup.<level>.<stamp>.log``)."""
    name = f"backup.{level}.{stamp}.log"
    try:
        sink = store.open_log(name)
        raw = sink.__enter__()
    except (errors.VirtnbdError, OSError) as err:
        log.warning("no run log in %s: %s", store.location, err)
        yield ""
        return
    handler = _RunLogHandler(fsutil.TextSink(raw))
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactFilter())
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield store.describe(name)
    finally:
        root.removeHandler(handler)
        with contextlib.suppress(OSError):
            sink.__exit__(None, None, None)


def work_dir(scratchdir: str) -> contextlib.AbstractContextManager[Path]:
    """Private local folder ``virtnbd.<pid>.<random>`` for the socket and scratch files; removed at exit."""
    return host.local_work_dir(scratchdir)


def remove_stale_work_dirs(scratchdir: str, alive: frozenset[int] = frozenset()) -> list[Path]:
    """Remove ``virtnbd.<pid>.*`` folders whose process is gone."""
    removed = []
    for path in Path(scratchdir).glob("virtnbd.*.*"):
        parts = path.name.split(".")
        if len(parts) != 3 or not parts[1].isdigit() or not path.is_dir():
            continue
        pid = int(parts[1])
        if pid in alive or pid == os.getpid() or pid_alive(pid):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


class SideFiles:
    """Side files of one point, written through the set's store; :meth:`discard` removes them if the run fails."""

    def __init__(self, store: Store, seal: Callable[[str, bytes], bytes] | None = None) -> None:
        self.store = store
        self.seal = seal            # encrypted chain: (name, plaintext) -> sealed object
        self.written: list[str] = []
        self.trees: list[str] = []

    def save(self, name: str, data: bytes) -> str:
        self.written.append(name)
        self.store.replace(name, data if self.seal is None else self.seal(name, data))
        return name

    def copy_file(self, name: str, source: str) -> str | None:
        try:
            data = host.current().read_file(source)
        except OSError as err:
            log.warning("cannot copy %s: %s", source, err.strerror or err)
            return None
        return self.save(name, data)

    def copy_tree(self, name: str, source: str) -> str | None:
        """A folder (TPM state) as ``name/<relative path>`` objects (symbolic links are not followed)."""
        if self.seal is not None:
            log.warning("%s not saved: an encrypted set does not hold folders (TPM state) yet", source)
            return None
        self.trees.append(name)
        self.store.remove_tree(name)
        try:
            with tempfile.TemporaryDirectory(prefix="virtnbd-side-") as tmpd:
                tree = Path(tmpd) / "tree"
                if not host.current().fetch_tree(source, tree):       # this host or over ssh
                    self.store.remove_tree(name)
                    self.trees.remove(name)
                    return None
                for path in sorted(p for p in tree.rglob("*") if p.is_file() and not p.is_symlink()):
                    self.store.replace(f"{name}/{path.relative_to(tree).as_posix()}", path.read_bytes())
        except OSError as err:
            log.warning("cannot copy %s: %s", source, err)
            self.store.remove_tree(name)
            self.trees.remove(name)
            return None
        return name

    def discard(self) -> None:
        """Best effort (the store may be what failed): what stays is listed by no manifest."""
        for name in reversed(self.written):
            with contextlib.suppress(errors.VirtnbdError, OSError):
                self.store.remove(name)
        for name in self.trees:
            with contextlib.suppress(errors.VirtnbdError, OSError):
                self.store.remove_tree(name)
        self.written.clear()
        self.trees.clear()


def qemu_img_info(path: str) -> dict[str, object] | None:
    """``qemu-img info --output=json`` (shared lock: the image is in use)."""
    try:
        proc = host.current().run(["qemu-img", "info", "--force-share", "--output=json", path], timeout=60)
        if proc.returncode != 0:
            log.warning("qemu-img info %s failed: %s", path, proc.stderr.strip())
            return None
        info = json.loads(proc.stdout)
    except (OSError, subprocess.SubprocessError, json.JSONDecodeError, errors.RemoteError) as err:
        log.warning("qemu-img info %s failed: %s", path, err)
        return None
    return info if isinstance(info, dict) else None


def stamp(now: float | None = None) -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
