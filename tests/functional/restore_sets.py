"""Synthetic backup sets for restore tests: streams written with StreamWriter, points committed
with backupset.manifest.commit_point, and a raw shadow image of the disk at every point.

The builder keeps the expected disk content (``shadow``) and the clusters changed since the last
checkpoint, exactly as a dirty bitmap would, so an inc holds only what changed since the previous
full/inc and a diff what changed since the newest checkpoint.
"""
from __future__ import annotations

import os
import random
import subprocess
import time

from virtnbd.backup.output import SideFiles
from virtnbd.backupset import manifest, naming
from virtnbd.backupset.sealed import EncryptedSet
from virtnbd.backupset.store import LocalStore
from virtnbd.stream.format import StreamMeta
from virtnbd.stream.writer import StreamWriter

DOMAIN_XML = """<domain type='qemu'>
  <name>{name}</name>
  <uuid>{uuid}</uuid>
  <memory unit='MiB'>64</memory>
  <os><type arch='x86_64' machine='q35'>hvm</type><nvram>/var/lib/libvirt/qemu/nvram/{name}_VARS.fd</nvram></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/{name}.qcow2'/>
      <target dev='sda' bus='sata'/>
    </disk>
    <disk type='file' device='cdrom'><target dev='sdb' bus='sata'/><readonly/></disk>
    <interface type='network'><mac address='52:54:00:11:22:33'/><source network='default'/></interface>
  </devices>
</domain>
"""


class SetBuilder:
    def __init__(self, folder: str, *, size: int = 8 << 20, cluster: int = 64 << 10, disk: str = "sda",
                 compression: str | None = None, seed: int = 1, name: str = "vnbdtest-set",
                 image_info: dict | None = None, crypt: EncryptedSet | None = None,
                 shadow_folder: str | None = None) -> None:
        self.folder = folder
        self.size = size
        self.cluster = cluster
        self.disk = disk
        self.compression = compression
        self.rng = random.Random(seed)
        self.name = name
        self.uuid = f"2b5c7e1a-0000-4000-8000-00000000{seed:04d}"
        self.shadow = bytearray(size)
        self.allocated: set[int] = set()
        self.dirty: set[int] = set()
        self.checkpoints: list[str] = []
        self.points: list[str] = []
        self.image_info = image_info
        self.time = "2026-11-22T00:00:00+00:00"   # time of the next point (retention tests set it)
        self.crypt = crypt                   # encrypted set (backupset/encrypted.EncryptedSet, from for_backup)
        self.shadow_folder = shadow_folder or folder
        os.makedirs(folder, exist_ok=True)

    # -- guest writes -------------------------------------------------------------
    def scribble(self, n: int, zero_share: float = 0.2) -> None:
        """``n`` random cluster writes (some of them zeroes) to the shadow."""
        clusters = self.size // self.cluster
        for _ in range(n):
            c = self.rng.randrange(clusters)
            if self.rng.random() < zero_share:
                data = bytes(self.cluster)
            else:
                data = self.rng.randbytes(self.cluster)
            self.shadow[c * self.cluster:(c + 1) * self.cluster] = data
            self.allocated.add(c)
            self.dirty.add(c)

    def resize(self, size: int) -> None:
        if size < self.size:
            del self.shadow[size:]
            self.allocated = {c for c in self.allocated if c < size // self.cluster}
            self.dirty = {c for c in self.dirty if c < size // self.cluster}
        else:
            self.shadow.extend(bytes(size - self.size))
        self.size = size

    # -- backups ------------------------------------------------------------------
    def _write(self, level: str, point: str, parent: str | None, checkpoint: str | None,
               clusters: list[int]) -> str:
        file = naming.data_file(self.disk, level, point)
        meta = StreamMeta(virtual_size=self.size, disk=self.disk, disk_format="qcow2", level=level,
                          checkpoint=checkpoint, parent=parent, time=self.time,
                          compression=self.compression, tool_version="test")
        path = os.path.join(self.folder, file)
        stages: tuple = ()
        if self.crypt is not None:
            meta, stages = self.crypt.writing(meta, file)
        with open(path, "wb") as f:
            w = StreamWriter(f, meta, path, stages=stages)
            for c in sorted(clusters):
                chunk = bytes(self.shadow[c * self.cluster:(c + 1) * self.cluster])
                if chunk.count(0) == len(chunk):
                    w.write_zero(c * self.cluster, len(chunk))
                else:
                    w.write_data(c * self.cluster, chunk)
            totals = w.finish()
        extra = {"image_info": self.image_info} if self.image_info else {}
        entry = manifest.disk_entry(meta, file, totals, extra)
        xml = DOMAIN_XML.format(name=self.name, uuid=self.uuid)
        point_extra: dict = {}
        if self.crypt is not None:
            xml = SideFiles(LocalStore(self.folder), self.crypt.seal_side).save(f"vmconfig.{point}.xml", xml.encode())
            point_extra = self.crypt.point_extra({"guest_info": {"hostname": "guest-" + self.name}})
        p = manifest.Point(name=point, level=level, parent=parent, checkpoint=checkpoint,
                           time=meta.time, disks={self.disk: entry}, domain_xml=xml, consistency="crash",
                           extra=point_extra)
        if self.crypt is not None:
            self.crypt.commit(p, self.name, self.uuid)
        else:
            manifest.commit_point(self.folder, p, self.name, self.uuid)
        self._save_shadow(point)
        self.points.append(point)
        return point

    def _save_shadow(self, point: str) -> None:
        path = self.shadow_path(point)
        with open(path, "wb") as f:
            f.truncate(self.size)
            for c in sorted(self.allocated):
                chunk = self.shadow[c * self.cluster:(c + 1) * self.cluster]
                if any(chunk):
                    f.seek(c * self.cluster)
                    f.write(chunk)

    def shadow_path(self, point: str) -> str:
        return os.path.join(self.shadow_folder, f"shadow.{point}.raw")

    def full(self) -> str:
        name = naming.checkpoint_name(len(self.checkpoints))
        self.checkpoints.append(name)
        self.dirty.clear()
        return self._write("full", name, None, name, sorted(self.allocated))

    def inc(self) -> str:
        name = naming.checkpoint_name(len(self.checkpoints))
        parent = self.checkpoints[-1]
        self.checkpoints.append(name)
        clusters = sorted(self.dirty)
        self.dirty.clear()
        return self._write("inc", name, parent, name, clusters)

    def diff(self) -> str:
        name = naming.diff_point_name(int(time.time() * 1000) + len(self.points))
        return self._write("diff", name, self.checkpoints[-1], None, sorted(self.dirty))


def small_lz4_chain(folder: str, incs: int) -> tuple[str, dict[str, str]]:
    """A 2 MiB lz4 set: a full of 30 cluster writes, then ``incs`` incs of 6 each; (folder, point -> shadow)."""
    b = SetBuilder(folder, size=2 << 20, compression="lz4")
    b.scribble(30)
    b.full()
    for _ in range(incs):
        b.scribble(6)
        b.inc()
    return b.folder, {p: b.shadow_path(p) for p in b.points}


def compare(image: str, fmt: str, shadow: str) -> str:
    """qemu-img compare output; raises when the images differ."""
    res = subprocess.run(["qemu-img", "compare", "-f", fmt, "-F", "raw", image, shadow],
                         check=False, capture_output=True, text=True)
    if res.returncode != 0:
        raise AssertionError(f"{image} differs from {shadow}: {res.stdout}{res.stderr}")
    if fmt == "qcow2":
        check = subprocess.run(["qemu-img", "check", "-f", "qcow2", image], check=False, capture_output=True,
                               text=True)
        if check.returncode != 0:
            raise AssertionError(f"qemu-img check {image}: {check.stdout}{check.stderr}")
    return res.stdout
