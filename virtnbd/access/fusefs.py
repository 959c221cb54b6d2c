"""virtnbdmount's filesystem: every point and disk of a set as ``MOUNTPOINT/<point>/<disk>.raw`` (pyfuse3).

Read-only. A file's data comes from a :class:`virtnbd.access.pointreader.PointReader`
opened on first use (chain checked, index loaded) and kept until unmount;
every frame a read touches is verified, a damaged one fails that read with
EIO and one log line naming file, point and offset. Unmount with ``umount``
(or ``fusermount3 -u``), SIGINT or SIGTERM.
"""
from __future__ import annotations

import errno
import logging
import os
import signal
import stat
import threading
from dataclasses import dataclass
from typing import Any

import pyfuse3
import trio

from virtnbd import errors
from virtnbd.access.options import MountOptions
from virtnbd.access.pointreader import PointReader, open_chain
from virtnbd.backupset import encrypted
from virtnbd.backupset.api import open_set
from virtnbd.restore import source

log = logging.getLogger(__name__)

ROOT = pyfuse3.ROOT_INODE


@dataclass(frozen=True)
class Node:
    inode: int
    name: bytes
    parent: int
    point: str
    disk: str | None            # None: the point's folder
    size: int


def layout(folder: str) -> list[Node]:
    """One folder per point, one ``<disk>.raw`` per disk of it (sizes from the manifest)."""
    manifest = source.manifest_of(open_set(folder))
    nodes: list[Node] = []
    inode = ROOT + 1
    for point in manifest.points:
        folder_node = Node(inode, point.name.encode(), ROOT, point.name, None, 0)
        nodes.append(folder_node)
        inode += 1
        for disk in sorted(point.disks):
            nodes.append(Node(inode, f"{disk}.raw".encode(), folder_node.inode, point.name, disk,
                              point.disks[disk].virtual_size))
            inode += 1
    return nodes


class SetFS(pyfuse3.Operations):
    def __init__(self, folder: str, nodes: list[Node]) -> None:
        super().__init__()
        self.folder = folder
        self.nodes = {n.inode: n for n in nodes}
        self.readers: dict[int, PointReader] = {}
        self._lock = threading.Lock()

    def close(self) -> None:
        for reader in self.readers.values():
            reader.close()

    def _attr(self, inode: int) -> pyfuse3.EntryAttributes:
        node = self.nodes.get(inode)
        if inode != ROOT and node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        a.st_uid, a.st_gid = os.getuid(), os.getgid()
        is_dir = node is None or node.disk is None
        a.st_mode = (stat.S_IFDIR | 0o555) if is_dir else (stat.S_IFREG | 0o444)
        a.st_nlink = 2 if is_dir else 1
        a.st_size = 0 if node is None else node.size
        a.st_blksize = 1 << 16
        a.st_blocks = (a.st_size + 511) // 512
        return a

    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return self._attr(inode)

    def _children(self, inode: int) -> list[Node]:
        return [n for n in self.nodes.values() if n.parent == inode]

    async def lookup(self, parent: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        found = next((n for n in self._children(parent) if n.name == name), None)
        if found is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(found.inode)

    async def opendir(self, inode: int, ctx: Any) -> int:
        if inode != ROOT and (inode not in self.nodes or self.nodes[inode].disk is not None):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        for n in self._children(fh):
            if n.inode > start_id and not pyfuse3.readdir_reply(token, n.name, self._attr(n.inode), n.inode):
                return

    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        if flags & (os.O_WRONLY | os.O_RDWR):
            raise pyfuse3.FUSEError(errno.EROFS)
        self._reader(inode)
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    def _reader(self, inode: int) -> PointReader:
        with self._lock:
            if inode not in self.readers:
                node = self.nodes[inode]
                try:
                    chain = source.select(self.folder, node.point, node.disk).disks[0]
                    self.readers[inode] = open_chain(chain)
                except errors.VirtnbdError as err:
                    log.error("%s/%s: %s", node.point, node.name.decode(), err)
                    raise pyfuse3.FUSEError(errno.EIO) from None
            return self.readers[inode]

    async def read(self, fh: int, off: int, size: int) -> bytes:
        reader = self._reader(fh)
        size = max(0, min(size, reader.size - off))
        try:
            return bytes(await trio.to_thread.run_sync(reader.pread, off, size))
        except errors.VirtnbdError as err:
            log.error("read %s %d+%d: %s", self.nodes[fh].name.decode(), off, size, err)
            raise pyfuse3.FUSEError(errno.EIO) from None


async def _serve(fs: SetFS) -> int:
    """Until unmounted (pyfuse3.main returns) or a signal; the signal number, else 0."""
    got = 0
    async with trio.open_nursery() as nursery:
        async def on_signal() -> None:
            nonlocal got
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    got = signum
                    nursery.cancel_scope.cancel()

        nursery.start_soon(on_signal)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()
    return got


def run(options: MountOptions) -> None:
    encrypted.use_for(options.input, options.key)       # a missing or wrong key fails before mounting
    nodes = layout(options.input)
    if not os.path.isdir(options.mountpoint):
        raise errors.UsageError(reason=f"{options.mountpoint}: not a directory")
    fs = SetFS(options.input, nodes)
    fuse_options = set(pyfuse3.default_options) | {"fsname=virtnbd", "ro"}
    try:
        pyfuse3.init(fs, options.mountpoint, fuse_options)
    except RuntimeError as err:
        raise errors.UsageError(reason=f"{options.mountpoint}: cannot mount: {err}") from err
    log.info("mounted %s on %s (%d point(s)); unmount with umount %s or Ctrl-C", options.input,
             options.mountpoint, sum(1 for n in nodes if n.disk is None), options.mountpoint)
    signum = 0
    try:
        signum = trio.run(_serve, fs)
    finally:
        pyfuse3.close(unmount=True)
        fs.close()
    if signum:
        raise errors.Interrupted(signum=signum, signame=signal.Signals(signum).name)
