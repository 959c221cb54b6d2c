"""The frozen record of one virtnbdbackup invocation (built by cli/backup.py)."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from virtnbd.backup.options import BackupOptions


@dataclass(frozen=True)
class FleetOptions:
    backup: BackupOptions                   # per-domain options; domain/output set per domain when many
    domains: tuple[str, ...] = ()           # -d a,b,c
    all_domains: bool = False               # --all
    exclude_domains: tuple[str, ...] = ()   # shell patterns
    match: tuple[str, ...] = ()             # shell patterns (--all: only these)
    parallel: int = 1
    hook: str | None = None
    metrics_file: str | None = None
    killonly: bool = False
    quiet: bool = False
    syslog: bool = False

    @property
    def many(self) -> bool:
        """Each domain into OUTPUT/<domain>/ (several, or --all) rather than OUTPUT itself."""
        return self.all_domains or len(self.domains) > 1

    @property
    def verbose(self) -> bool:
        return self.backup.verbose

    @property
    def strict(self) -> bool:
        return self.backup.strict

    def for_domain(self, domain: str) -> FleetOptions:
        """The one-domain run of ``domain`` (what a child process of a many-domain run executes)."""
        output = os.path.join(self.backup.output, domain) if self.many else self.backup.output
        backup = dataclasses.replace(self.backup, domain=domain, output=output)
        return dataclasses.replace(self, backup=backup, domains=(domain,), all_domains=False,
                                   exclude_domains=(), match=(), hook=None, metrics_file=None)
