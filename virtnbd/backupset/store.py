"""Where a backup set's bytes live: the Store protocol, the local folder store, stores by URL scheme.

A store holds named objects (flat names: ``sda.full.data``, the manifest,
side files; ``checkpoints/<name>.xml`` is the only nested name). Every write
is atomic: :meth:`Store.create` writes a partial object that becomes visible
under its final name only when the block exits cleanly; :meth:`Store.replace`
swaps a small object (the manifest) whole. A location without ``scheme://``
is a local folder; other schemes are registered with :func:`register`
(``s3`` by the object-storage store).
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import re
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager as ContextManager
from pathlib import Path
from typing import BinaryIO, Protocol, cast

from virtnbd import errors, fsutil
from virtnbd.backupset import outfile

LOCK_FILE = ".virtnbdbackup.lock"

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


class Store(Protocol):
    location: str          # for messages: the folder path, or the URL

    def exists(self) -> bool: ...                       # the set's container (folder, prefix) exists
    def prepare(self) -> None: ...                      # create it (0700) and check it is writable
    def open_read(self, name: str) -> BinaryIO: ...     # sequential reads; seekable + fileno where local
    def pread(self, name: str, offset: int, length: int) -> bytes: ...   # one ranged read
    def read_bytes(self, name: str) -> bytes | None: ...  # a small object whole; None when absent
    def create(self, name: str, staging_blocks: int = 0) -> ContextManager[BinaryIO]: ...
    # partial until the block exits cleanly, then published under ``name`` (removed on error);
    # staging_blocks > 0: a large sequential object, staged in that many 4 MiB blocks
    def replace(self, name: str, data: bytes) -> None: ...          # small object, atomically
    def list(self) -> list[str]: ...                    # names of the objects (top level), sorted
    def size(self, name: str) -> int | None: ...        # None when absent
    def remove(self, name: str) -> None: ...
    def lock(self) -> ContextManager[None]: ...         # exclusive; refuses a concurrent run (LockedError)
    def describe(self, name: str) -> str: ...           # the object's full name for messages


class LocalStore:
    """A folder on a local file system (the first and default store)."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.root = Path(folder)
        self.location = os.fspath(folder)

    def path(self, name: str) -> Path:
        """Local path of an object (local-only: for tools that need a file, e.g. qemu-img)."""
        return self.root / name

    def describe(self, name: str) -> str:
        return os.path.join(self.location, name)

    def exists(self) -> bool:
        return self.root.is_dir()

    def prepare(self) -> None:
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as err:
            raise fsutil.storage_error(self.root, err) from err
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise errors.BackupSetError(path=str(self.root), reason="backup folder is not writable")

    def open_read(self, name: str) -> BinaryIO:
        return open(self.root / name, "rb")  # noqa: SIM115 - the caller closes it

    def pread(self, name: str, offset: int, length: int) -> bytes:
        with self.open_read(name) as f:
            return os.pread(f.fileno(), length, offset)

    def read_bytes(self, name: str) -> bytes | None:
        try:
            return (self.root / name).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as err:
            raise errors.BackupSetError(path=str(self.root / name), reason=err.strerror or str(err)) from err

    @contextlib.contextmanager
    def create(self, name: str, staging_blocks: int = 0) -> Iterator[BinaryIO]:
        """``name.partial`` until a clean exit, then fsync + rename (fsutil.partial_file).

        With ``staging_blocks`` the data goes through :class:`~virtnbd.backupset.outfile.StagedFile`
        (O_DIRECT / pipelined writeback, file digest computed as it is staged).
        """
        with fsutil.partial_file(self.root / name) as f:
            if not staging_blocks:
                yield f
                return
            partial = str(fsutil.partial_path(self.root / name))
            with outfile.StagedFile(partial, blocks=staging_blocks) as staged:
                yield cast(BinaryIO, staged)

    def replace(self, name: str, data: bytes) -> None:
        fsutil.save_atomic(self.root / name, data)

    def list(self) -> list[str]:
        try:
            return sorted(p.name for p in self.root.iterdir() if p.is_file())
        except OSError as err:
            raise errors.BackupSetError(path=str(self.root), reason=err.strerror or str(err)) from err

    def size(self, name: str) -> int | None:
        try:
            return (self.root / name).stat().st_size
        except FileNotFoundError:
            return None

    def remove(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.root / name).unlink()

    def lock(self) -> ContextManager[None]:
        return folder_lock(self.root)


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Exclusive lock of the backup folder (flock: a dead holder releases it by itself)."""
    path = folder / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as err:
        raise fsutil.storage_error(path, err) from err
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            raise errors.LockedError(path=str(folder), pid=holder,
                                     reason="another virtnbdbackup run uses this folder") from err
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
        os.ftruncate(fd, 0)
    finally:
        os.close(fd)


def folder_in_use(folder: Path) -> bool:
    """A live process (another one: flock is per open file) holds ``folder``'s backup lock.

    Push-mode jobs carry no process id: a stale one is told by its target folder's lock.
    """
    try:
        fd = os.open(folder / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


_STORES: dict[str, Callable[[str], Store]] = {}


def register(scheme: str, opener: Callable[[str], Store]) -> None:
    """Make ``scheme://...`` locations open with ``opener(location)`` (e.g. ``s3``)."""
    _STORES[scheme.lower()] = opener


def _open_s3(location: str) -> Store:
    from virtnbd.backupset import s3store  # boto3 is imported only for s3:// locations

    return s3store.open_object_store(location)


register("s3", _open_s3)


def scheme_of(location: str) -> str | None:
    found = _SCHEME.match(location)
    return found.group(1).lower() if found else None


def open_store(location: str | os.PathLike[str]) -> Store:
    """The store of a location: a registered ``scheme://`` or else a local folder."""
    text = os.fspath(location)
    scheme = scheme_of(text)
    if scheme is None:
        return LocalStore(text)
    opener = _STORES.get(scheme)
    if opener is None:
        known = ", ".join(f"{s}://" for s in sorted(_STORES)) or "none"
        raise errors.BackupSetError(path=text, reason=f"unknown storage scheme {scheme}:// "
                                                      f"(a local folder, or one of: {known})")
    return opener(text)
