"""Options of abbbi/virtnbdbackup 2.x that virtnbd accepts as no-ops or refuses.

Each entry is one row of README's "Switching from virtnbdbackup" table. An
``ignored`` option is accepted (scripts keep working) and logs why it has no
effect; a ``refused`` one stops before any job with a message that names the
virtnbd way. Options that work the same are plain argparse options.
"""
from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from virtnbd import errors

log = logging.getLogger(__name__)

REMOTE = ("remote hosts are not supported by this version: run the command on the KVM host itself "
          "(local qemu:///system)")


@dataclass(frozen=True)
class Foreign:
    flags: tuple[str, ...]
    verdict: str                  # "ignored" | "refused"
    why: str
    takes_value: bool = False


_REMOTE_ROWS: tuple[Foreign, ...] = (
    Foreign(("--user",), "refused", REMOTE, takes_value=True),
    Foreign(("--ssh-user",), "refused", REMOTE, takes_value=True),
    Foreign(("--ssh-port",), "refused", REMOTE, takes_value=True),
    Foreign(("--password",), "refused", "passwords are never taken on the command line (they show in ps "
            "and shell history); " + REMOTE, takes_value=True),
    Foreign(("-P", "--nbd-port"), "refused", REMOTE, takes_value=True),
    Foreign(("-I", "--nbd-ip"), "refused", REMOTE, takes_value=True),
    Foreign(("--tls",), "refused", REMOTE),
    Foreign(("--tls-cert",), "refused", REMOTE, takes_value=True),
)

URI_PARTS = "user and ssh port go into the URI: -U qemu+ssh://USER@HOST:PORT/system?keyfile=KEY"

_BACKUP_REMOTE_ROWS: tuple[Foreign, ...] = (
    Foreign(("--user",), "refused", "libvirt authentication goes into the URI; " + URI_PARTS, takes_value=True),
    Foreign(("--ssh-user",), "refused", URI_PARTS, takes_value=True),
    Foreign(("--ssh-port",), "refused", URI_PARTS, takes_value=True),
    Foreign(("--password",), "refused", "passwords are never taken on the command line (they show in ps "
            "and shell history); use an ssh key (keyfile= in the URI)", takes_value=True),
    Foreign(("--tls",), "ignored", "NBD over TLS is the default for remote hosts (--no-tls turns it off)"),
)

BACKUP: tuple[Foreign, ...] = (
    Foreign(("-r", "--raw"), "ignored", "raw disks are always backed up (copied whole at every point); "
            "leave them out with -x"),
    Foreign(("-C", "--checkpointdir"), "ignored", "checkpoint XML is kept with every point in "
            "OUTPUT/checkpoints/ and redefined from there", takes_value=True),
    Foreign(("-S", "--start-domain"), "ignored", "a shut-off domain is backed up read-only from its images "
            "with qemu-nbd; it is never started"),
    Foreign(("--no-sparse-detection",), "ignored", "zero ranges of incrementals are always recorded: "
            "that keeps restores exact and costs no extra reads"),
    Foreign(("-q", "--qemu"), "ignored", "extents always come from NBD block status (allocation and "
            "dirty bitmap), which is what qemu-img map reads too"),
    Foreign(("--nocolor",), "ignored", "virtnbd prints no colours"),
    Foreign(("-s", "--startonly"), "refused", "virtnbd never leaves a backup job running; to read a "
            "point without restoring it see virtnbdrestore"),
    *_BACKUP_REMOTE_ROWS,
)

RESTORE: tuple[Foreign, ...] = (
    Foreign(("-r", "--raw"), "ignored", "every selected disk is restored in one format: --format raw "
            "restores raw images"),
    Foreign(("-f", "--socketfile"), "ignored", "virtnbdrestore writes images directly, it starts no NBD "
            "server", takes_value=True),
    Foreign(("-B", "--buffsize"), "ignored", "verify reads whole checked frames; -w sets its parallelism",
            takes_value=True),
    Foreign(("--nocolor",), "ignored", "virtnbd prints no colours"),
    Foreign(("-C", "--config-file"), "refused", "the domain XML saved with the restored point "
            "(vmconfig.<point>.xml) is adjusted; choose the point with -u/--until", takes_value=True),
    Foreign(("--password",), "refused", "passwords are never taken on the command line (they show in ps "
            "and shell history): put it in a file (mode 0600) and give --password-file FILE", takes_value=True),
    Foreign(("--user",), "refused", "the user goes into the URI: -U qemu+ssh://USER@HOST/system", takes_value=True),
    Foreign(("--ssh-user",), "refused", "the ssh user goes into the URI: -U qemu+ssh://USER@HOST/system",
            takes_value=True),
    Foreign(("--ssh-port",), "refused", "the ssh port goes into the URI: -U qemu+ssh://USER@HOST:PORT/system",
            takes_value=True),
    Foreign(("--tls",), "ignored", "a remote restore always uses TLS (--tls-cert DIR); --no-tls turns it off"),
)


class _Refuse(argparse.Action):
    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: str | Sequence[Any] | None, option_string: str | None = None) -> None:
        raise errors.UsageError(reason=f"{option_string}: {self.help}")


class _Ignore(argparse.Action):
    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: str | Sequence[Any] | None, option_string: str | None = None) -> None:
        namespace.ignored = [*getattr(namespace, "ignored", []), f"{option_string} has no effect: {self.help}"]


def add_arguments(parser: argparse.ArgumentParser, table: Sequence[Foreign]) -> None:
    g = parser.add_argument_group("accepted for compatibility with abbbi/virtnbdbackup (see README)")
    parser.set_defaults(ignored=[])
    for row in table:
        action = _Ignore if row.verdict == "ignored" else _Refuse
        g.add_argument(*row.flags, action=action, nargs=1 if row.takes_value else 0, help=row.why,
                       dest=f"foreign_{row.flags[-1].lstrip('-').replace('-', '_')}", default=None)


def log_ignored(namespace_ignored: Sequence[str]) -> None:
    for line in namespace_ignored:
        log.info("%s", line)
