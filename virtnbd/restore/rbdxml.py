"""Point a disk of the adjusted domain XML at a restored RBD image (``-c`` with RBD targets).

The disk becomes ``<disk type='network'>`` with ``<source protocol='rbd'
name='POOL/IMAGE'>`` and one ``<host>`` per monitor of the cluster (legacy
v1 addresses, which is what QEMU's rbd driver passes on). Authentication: the
``<auth>`` of the original disk is kept when it was an RBD disk already (same
libvirt secret); otherwise ``<auth username='ID'>`` refers to a libvirt secret
by its usage name ``client.ID secret``, which must exist before the domain starts.
"""
from __future__ import annotations

import logging
import re
from typing import Any

from lxml import etree

from virtnbd import rbdconn

log = logging.getLogger(__name__)


def mon_hosts(mon_host: str) -> list[tuple[str, str | None]]:
    """``mon host`` value -> [(address, port or None)], one per monitor, v1 address preferred."""
    hosts: list[tuple[str, str | None]] = []
    for group in re.findall(r"\[[^\]]*\]|[^,;\s\[\]]+", mon_host):
        addrs = [a.strip() for a in group.strip("[]").split(",") if a.strip()]
        legacy = [a for a in addrs if a.startswith("v1:")] or [a for a in addrs if not a.startswith("v2:")] or addrs
        addr = re.sub(r"^v[12]:", "", legacy[0]).split("/")[0]
        host, sep, port = addr.rpartition(":")
        if sep and port.isdigit() and not host.endswith(":"):
            hosts.append((host.strip("[]"), port))
        else:
            hosts.append((addr.strip("[]"), None))
    return hosts


def cluster_mon_host(options: rbdconn.CephOptions) -> str:
    """The ``mon host`` setting of the config (read locally, no connection)."""
    import rados

    cluster = rados.Rados(conffile=options.conf, rados_id=options.client_id)
    try:
        return str(cluster.conf_get("mon_host") or "")
    finally:
        cluster.shutdown()


def make_network_disk(disk: Any, spec: str, options: rbdconn.CephOptions, mon_host: str | None = None) -> None:
    """Rewrite the ``<disk>`` element ``disk`` in place to use RBD image ``spec``."""
    image = rbdconn.parse_spec(spec)
    old_source = disk.find("source")
    old_auth = disk.find("auth")
    if old_auth is None and old_source is not None:
        old_auth = old_source.find("auth")
    was_rbd = disk.get("type") == "network" and old_source is not None and old_source.get("protocol") == "rbd"
    for old in disk.findall("source") + disk.findall("backingStore") + disk.findall("auth"):
        disk.remove(old)
    disk.set("type", "network")
    driver = disk.find("driver")
    if driver is None:
        driver = etree.Element("driver", name="qemu")
        disk.insert(0, driver)
    driver.set("type", "raw")
    source = etree.Element("source", protocol="rbd", name=f"{image.pool}/{image.image}")
    for host, port in mon_hosts(mon_host if mon_host is not None else cluster_mon_host(options)):
        el = etree.SubElement(source, "host", name=host)
        if port:
            el.set("port", port)
    if was_rbd and old_auth is not None:
        source.append(old_auth)
    else:
        auth = etree.SubElement(source, "auth", username=options.client_id)
        etree.SubElement(auth, "secret", type="ceph", usage=f"client.{options.client_id} secret")
        log.warning("%s: the adjusted XML uses the libvirt secret with usage 'client.%s secret': define it "
                    "(virsh secret-define / secret-set-value) before starting the domain", spec, options.client_id)
    driver.addnext(source)
