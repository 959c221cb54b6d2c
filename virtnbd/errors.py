"""Errors as data: one root class, a message template per class.

Every error a user can meet is a subclass of :class:`VirtnbdError`. A class
sets ``template`` (formatted with the keyword fields given at raise time) and
``exit_code``. Library code raises these (``raise X(...) from err``); only
:func:`virtnbd.cli.shell.run_main` turns them into a message and an exit code.
"""
from __future__ import annotations

from typing import Any

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_WARNINGS = 2
EXIT_SIGNAL_BASE = 128


class VirtnbdError(Exception):
    """Root of every error virtnbd raises on purpose."""

    template = "{reason}"
    exit_code = EXIT_ERROR

    def __init__(self, **fields: Any) -> None:
        self.fields = fields
        super().__init__(self.message)

    @property
    def message(self) -> str:
        try:
            return self.template.format(**self.fields)
        except (KeyError, IndexError):
            return f"{type(self).__name__}: {self.fields}"

    def __getattr__(self, name: str) -> Any:
        fields = self.__dict__.get("fields", {})
        if name in fields:
            return fields[name]
        raise AttributeError(name)


class UsageError(VirtnbdError):
    """Bad command-line input that argparse itself cannot see."""

    template = "{reason}"


class Interrupted(VirtnbdError):
    """SIGINT or SIGTERM arrived; raised so that cleanup code runs."""

    template = "interrupted by signal {signame}"

    @property
    def exit_code(self) -> int:  # type: ignore[override]
        return EXIT_SIGNAL_BASE + int(self.fields["signum"])


class FormatError(VirtnbdError):
    """A stream or backup-set file is corrupt, truncated or not ours."""

    template = "{path}: offset {offset}: {reason}"


class ChainError(VirtnbdError):
    """The backup chain is broken, inconsistent or does not hold a point."""

    template = "{reason}"


class BackupSetError(VirtnbdError):
    """A backup folder cannot be used (missing, foreign, locked, ...)."""

    template = "{path}: {reason}"


class LockedError(BackupSetError):
    template = "{path}: locked by running process {pid} ({reason})"


class LibvirtError(VirtnbdError):
    """libvirt refused or failed an operation."""

    template = "libvirt: {reason}"


class DomainNotFound(LibvirtError):
    template = "domain not found: {domain}"


class CheckpointError(LibvirtError):
    template = "checkpoint {checkpoint}: {reason}"


class NbdError(VirtnbdError):
    """An NBD connection or request failed."""

    template = "nbd {export}: {reason}"


class StorageError(VirtnbdError):
    """Writing output failed (ENOSPC, permissions, ...)."""

    template = "{path}: {reason}"


class RestoreError(VirtnbdError):
    template = "{reason}"


class CephError(VirtnbdError):
    template = "ceph: {reason}"


class AgentError(VirtnbdError):
    template = "guest agent: {reason}"


class EncryptionError(VirtnbdError):
    """A key is missing, wrong or does not fit the set; a key slot file is damaged."""

    template = "{path}: {reason}"


class KeyRequired(EncryptionError):
    template = "{path}: {reason}"


class WrongKey(EncryptionError):
    template = "{path}: {reason}"


class SecretError(VirtnbdError):
    """A password file, private key or certificate folder cannot be used (missing, readable by others)."""

    template = "{path}: {reason}"


class RemoteError(VirtnbdError):
    """A remote KVM host could not be reached or used (ssh, host key, TLS, ports, remote tools)."""

    template = "{host}: {reason}"
