"""virtnbdrestore's Ceph RBD options: argparse group -> (targets, RbdOptions)."""
from __future__ import annotations

import argparse

from virtnbd import errors, rbdconn
from virtnbd.restore.targets import scheme_of
from virtnbd.restore.targets.rbd import RbdOptions, parse_features, parse_object_size


def add_ceph_arguments(g: argparse._ActionsContainer) -> None:
    """How to reach the Ceph cluster (virtnbdrestore and virtnbdbackup)."""
    g.add_argument("--ceph-conf", default=rbdconn.DEFAULT_CONF, metavar="FILE",
                   help=f"Ceph config (default {rbdconn.DEFAULT_CONF})")
    g.add_argument("--ceph-id", default=rbdconn.DEFAULT_ID, metavar="ID",
                   help=f"cephx client id without 'client.' (default {rbdconn.DEFAULT_ID})")
    g.add_argument("--ceph-keyring", metavar="FILE",
                   help="keyring (default /etc/ceph/ceph.client.<id>.keyring, else what the config says)")
    g.add_argument("--ceph-timeout", type=int, default=rbdconn.CephOptions.connect_timeout, metavar="SECONDS",
                   help=f"give up reaching the cluster after this long (default {rbdconn.CephOptions.connect_timeout})")


def ceph_options(args: argparse.Namespace) -> rbdconn.CephOptions:
    if args.ceph_timeout < 1:
        raise errors.UsageError(reason="--ceph-timeout must be at least 1 second")
    return rbdconn.CephOptions(conf=args.ceph_conf, client_id=args.ceph_id, keyring=args.ceph_keyring,
                               connect_timeout=args.ceph_timeout)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("Ceph RBD targets (-o rbd:POOL: one image per disk, named after the disk)")
    g.add_argument("--target", action="append", default=[], metavar="[DISK=]rbd:POOL/IMAGE",
                   help="restore DISK into this RBD image (repeat per disk; DISK= may be left out when one disk "
                        "is restored)")
    add_ceph_arguments(g)
    g.add_argument("--rbd-features", metavar="F1,F2",
                   help="features of new images, e.g. layering,exclusive-lock,object-map,fast-diff "
                        "(default: the cluster's rbd_default_features)")
    g.add_argument("--rbd-object-size", metavar="SIZE", help="object size of new images, e.g. 4M (default: cluster's)")
    g.add_argument("--overwrite", action="store_true",
                   help="restore into an existing RBD image (not in use) instead of refusing")
    g.add_argument("--rbd-snapshot", action="store_true",
                   help="when done, snapshot each RBD image, named after the restored point")


def parse_targets(values: list[str]) -> tuple[tuple[str, str], ...]:
    """``[DISK=]rbd:POOL/IMAGE`` items -> ((disk or "", spec), ...)."""
    found: list[tuple[str, str]] = []
    for value in values:
        disk, sep, spec = value.partition("=")
        if not sep:
            disk, spec = "", value
        if scheme_of(spec) != "rbd":
            raise errors.UsageError(reason=f"--target {value}: expected [DISK=]rbd:POOL/IMAGE")
        rbdconn.parse_spec(spec)
        if any(d == disk for d, _ in found):
            raise errors.UsageError(reason=f"--target given twice for {disk or 'the disk'}")
        found.append((disk, spec))
    if len(found) > 1 and any(not d for d, _ in found):
        raise errors.UsageError(reason="with several --target options each needs DISK=: e.g. --target sda=rbd:p/i")
    return tuple(found)


def rbd_options(args: argparse.Namespace) -> RbdOptions:
    return RbdOptions(
        ceph=ceph_options(args),
        features=parse_features(args.rbd_features) if args.rbd_features else None,
        object_size=parse_object_size(args.rbd_object_size) if args.rbd_object_size else None,
        overwrite=args.overwrite,
        snapshot=args.rbd_snapshot,
    )
