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
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager as ContextManager
from pathlib import Path
from typing import BinaryIO, Protocol, cast

from virtnbd import errors, fsutil
from virtnbd.backupset import naming, outfile

log = logging.getLogger(__name__)
Names = list[str]     # (the classes below have a method named list)

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
    # -- run life cycle, sub-folders (archived chains) -----------------------------------
    def recover(self) -> Names: ...                 # drop what a killed writer left (partials, uploads)
    def open_log(self, name: str) -> ContextManager[BinaryIO]: ...   # a run's log (published at exit, always)
    def set_modes(self, umask: int | None) -> None: ... # --umask: modes it implies (no-op without file modes)
    def sub(self, name: str) -> Store: ...              # the store of a sub-folder / sub-prefix
    def folders(self) -> Names: ...                 # names of the sub-folders, sorted
    def remove_tree(self, name: str) -> None: ...       # a sub-folder and all it holds
    def archive(self, name: str) -> None: ...           # move the chain into sub-folder ``name`` (crash-safe)


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
        if "/" in name:
            _mkdirs(self.root, name)
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
            fsutil.fsync_dir((self.root / name).parent)

    def lock(self) -> ContextManager[None]:
        return folder_lock(self.root)

    def archive(self, name: str) -> None:
        """Move every file of the chain into ``name/``: into ``.name.moving`` first (the manifest last),
        then rename that folder; :meth:`recover` finishes a move a killed run left."""
        tmp = self.root / f".{name}{naming.MOVING}"
        try:
            tmp.mkdir(mode=0o700)
            _finish_move(self.root, tmp)
        except OSError as err:
            raise fsutil.storage_error(tmp, err) from err

    def recover(self) -> Names:
        """Finish moves of old chains; remove partial files (``*.partial``) and temp files (``.*.tmp``)."""
        return self._resume_moves() + self._remove_partials()

    def _resume_moves(self) -> Names:
        done = []
        for tmp in sorted(self.root.glob(f".{naming.ARCHIVE_PREFIX}*{naming.MOVING}")):
            if not tmp.is_dir():
                continue
            try:
                final = _finish_move(self.root, tmp)
            except OSError as err:
                raise errors.BackupSetError(path=str(tmp), reason=f"cannot finish moving an old chain: {err}") from err
            log.warning("finished moving the old chain of an interrupted run into %s", final)
            done.append(final.name)
        return done

    def _remove_partials(self) -> Names:
        found = sorted([*self.root.glob(f"*{fsutil.PARTIAL_SUFFIX}"), *self.root.glob(".*.tmp")])
        for path in found:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        for path in found:
            log.warning("removed %s left by a killed run", path.name)
        return [p.name for p in found]

    @contextlib.contextmanager
    def open_log(self, name: str) -> Iterator[BinaryIO]:
        """Written in place as it goes (a killed run's log stays)."""
        with open(self.root / name, "ab") as f:
            yield f

    def set_modes(self, umask: int | None) -> None:
        fsutil.apply_modes(self.root, umask)

    def sub(self, name: str) -> LocalStore:
        return LocalStore(self.root / name)

    def folders(self) -> Names:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir())

    def remove_tree(self, name: str) -> None:
        path = self.root / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            self.remove(name)


def _move_all(folder: Path, tmp: Path) -> None:
    manifest = folder / naming.MANIFEST
    for entry in sorted(folder.iterdir()):
        if naming.stays(entry.name) or entry == manifest:
            continue
        os.replace(entry, tmp / entry.name)
    if manifest.exists():
        os.replace(manifest, tmp / naming.MANIFEST)
    fsutil.fsync_dir(tmp)
    fsutil.fsync_dir(folder)


def _finish_move(folder: Path, tmp: Path) -> Path:
    final = folder / tmp.name[1:-len(naming.MOVING)]
    _move_all(folder, tmp)
    os.replace(tmp, final)
    fsutil.fsync_dir(folder)
    return final


def _mkdirs(root: Path, name: str) -> None:
    try:
        (root / name).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as err:
        raise fsutil.storage_error(root / name, err) from err


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
