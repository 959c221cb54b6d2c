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
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from virtnbd import errors, fsutil
from virtnbd.backupset.store import LOCK_FILE, LocalStore, folder_lock
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


class _RunLogHandler(logging.FileHandler):
    """The run's log file is best effort: a folder that turns read-only or full must not
    print logging tracebacks or hide the run's own error line (stderr still has every message)."""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging's name)
        self.failed = True

    def close(self) -> None:
        with contextlib.suppress(OSError):
            super().close()


@contextlib.contextmanager
def run_log(folder: Path, level: str, stamp: str) -> Iterator[Path]:
    """A DEBUG log file for this run inside the backup folder."""
    path = folder / f"backup.{level}.{stamp}.log"
    handler = _RunLogHandler(path, encoding="utf-8")
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactFilter())
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield path
    finally:
        root.removeHandler(handler)
        handler.close()


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
    """Side files of one point; :meth:`discard` removes what was written if the run fails."""

    def __init__(self, folder: Path, seal: Callable[[str, bytes], bytes] | None = None) -> None:
        self.folder = folder
        self.seal = seal            # encrypted chain: (name, plaintext) -> sealed object
        self.written: list[Path] = []

    def save(self, name: str, data: bytes) -> str:
        path = self.folder / name
        path.parent.mkdir(mode=0o700, exist_ok=True)
        fsutil.save_atomic(path, data if self.seal is None else self.seal(name, data))
        self.written.append(path)
        return name

    def copy_file(self, name: str, source: str) -> str | None:
        try:
            data = host.current().read_file(source)
        except OSError as err:
            log.warning("cannot copy %s: %s", source, err.strerror or err)
            return None
        return self.save(name, data)

    def copy_tree(self, name: str, source: str) -> str | None:
        if self.seal is not None:
            log.warning("%s not saved: an encrypted set does not hold folders (TPM state) yet", source)
            return None
        target = self.folder / name
        tmp = self.folder / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            if not host.current().fetch_tree(source, tmp):
                return None
            shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)
        except OSError as err:
            shutil.rmtree(tmp, ignore_errors=True)
            log.warning("cannot copy %s: %s", source, err)
            return None
        self.written.append(target)
        return name

    def discard(self) -> None:
        for path in reversed(self.written):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    path.unlink()
        self.written.clear()


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
