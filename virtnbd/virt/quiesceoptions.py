"""How a backup makes its point consistent: the options only, without libvirt (``--help`` and the
command line build them; virtnbd.virt.agent applies them)."""
from __future__ import annotations

from dataclasses import dataclass

from virtnbd import errors


@dataclass(frozen=True)
class QuiesceOptions:
    """How to make the backup point consistent (built by cli/backup.py).

    freeze: freeze guest filesystems via the agent (``--no-freeze`` clears it);
    mountpoints: freeze only these (``-F/--freeze-mountpoint a,b``), all when empty;
    pause: suspend the domain around the job start instead of freezing (``--pause``);
    timeout: seconds to wait for the agent to answer (``--agent-timeout``).
    """

    freeze: bool = True
    mountpoints: tuple[str, ...] = ()
    pause: bool = False
    timeout: int = 10

    def __post_init__(self) -> None:
        if self.timeout <= 0:
            raise errors.UsageError(reason=f"agent timeout must be a positive number of seconds, not {self.timeout}")
        bad = [m for m in self.mountpoints if not m.startswith("/")]
        if bad:
            raise errors.UsageError(reason=f"freeze mountpoints must be absolute paths: {', '.join(bad)}")
