"""The run's one remote shell: every command and the guardian of the work folders, in ONE ssh session.

Each command used to be an ssh session of its own (a new ``ssh`` client, a channel, a remote login
shell: 0.1-0.8 s each); here a request is a few lines on the session's stdin and costs a pipe round
trip. The shell also guards the work folders it made (``work``): when the run ends normally they are
released (``release``: qemu-nbd servers with a pid file there stopped, the folder removed); when the
run dies - even SIGKILL: the ssh master is our child, so the session's stdin reaches end-of-file - the
shell stops those servers, aborts a backup job still using a folder, removes it, and exits. It ignores
HUP, INT, TERM and PIPE, so a lost connection cannot stop it half-way.

It is the ssh master's own session (``SshConnection.open(SHELL_ARGV)``): it starts with the connection,
no second session has to be opened, and its login overlaps the libvirt connect (libvirt rides on a
socket forward of the same master).
A command that times out leaves the shell's state unknown: it is not used again (later commands take
an ssh session each, the guardian still cleans up at the end).
"""
from __future__ import annotations

import logging
import os
import selectors
import shlex
import subprocess
import threading
import time
from collections.abc import Sequence

from virtnbd import errors
from virtnbd.remote.ssh import SshConnection, last_line

log = logging.getLogger(__name__)

# Stopping a process on the host: TERM, wait (a zombie counts as gone: where PID 1 reaps slowly,
# ``kill -0`` alone would wait seconds for a process that has long exited), KILL after 10 s.
STOP_PID = r"""
alive() {
  kill -0 "$1" 2>/dev/null || return 1
  [ -r "/proc/$1/stat" ] || return 0
  s=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null); [ -n "$s" ] && [ "${s%% *}" != Z ]
}
stop_pid() {
  kill "$1" 2>/dev/null; i=0
  while alive "$1"; do
    i=$((i+1)); [ $i -gt 200 ] && { kill -9 "$1" 2>/dev/null; break; }; sleep 0.05
  done
}
"""

# The run's one remote shell (see :class:`RemoteShell`): commands in, framed answers out; the guardian
# of the work folders it made. A request is ``run N`` / ``work N`` / ``release N`` followed by N lines
# of shell-quoted words; the answer is ``RC OUTLEN ERRLEN`` and that many bytes of stdout and stderr.
SHELL = STOP_PID + r"""
set -u
t=$(mktemp -d "${TMPDIR:-/tmp}/virtnbd-shell.XXXXXXXX") || exit 1
tab=$(printf '\t')
: >"$t/works"
clean() {   # $1 folder, $2 domain whose job may still use it ("" = the run ended it)
  for f in "$1"/*.pid; do [ -f "$f" ] && stop_pid "$(cat "$f")"; done
  # a qemu-nbd killed with us before it wrote its pid file: found by the pid file it names
  i=0
  while pgrep -f -- "--pid-file=$1/" >/dev/null 2>&1 && [ $i -lt 50 ]; do
    pkill -f -- "--pid-file=$1/" 2>/dev/null; sleep 0.1; i=$((i+1))
  done
  pkill -9 -f -- "--pid-file=$1/" 2>/dev/null
  if [ -n "$2" ] && command -v virsh >/dev/null 2>&1 &&
     virsh -q -c qemu:///system backup-dumpxml "$2" 2>/dev/null | grep -qF "$1/"
  then virsh -q -c qemu:///system domjobabort "$2" >/dev/null 2>&1; fi
  rm -rf "$1"
}
work() {    # $1 scratch folder, $2 domain, $3 our pid
  d=$(mktemp -d "$1/virtnbd.$3.XXXXXXXX") || return 1
  chmod 1733 "$d" && printf '%s\t%s\n' "$2" "$d" >>"$t/works" && echo "$d"
}
release() {
  clean "$1" ""; awk -F "$tab" -v d="$1" '$2 != d' "$t/works" >"$t/w"; mv "$t/w" "$t/works"
}
trap '' HUP INT TERM PIPE
echo ready
while read -r op n; do
  c=
  while [ "$n" -gt 0 ]; do IFS= read -r l || break 2; c="$c$l
"; n=$((n-1)); done
  eval "set -- $c"
  case $op in
    run) "$@" ;;
    work) work "$@" ;;
    release) release "$@" ;;
    *) false ;;
  esac </dev/null >"$t/o" 2>"$t/e"
  printf '%s %s %s\n' "$?" "$(wc -c <"$t/o")" "$(wc -c <"$t/e")"
  cat "$t/o" "$t/e"
done
while IFS="$tab" read -r dom d; do clean "$d" "$dom"; done <"$t/works"
rm -rf "$t"
echo gone
"""

SHELL_ARGV = ("sh", "-c", SHELL, "virtnbd-shell")


class ShellBroken(Exception):
    """The shell cannot be used (ended, timed out): the caller falls back to an ssh session."""


class RemoteShell:
    """One long-lived ``sh`` on the host over the run's ssh master (see the module doc)."""

    def __init__(self, ssh: SshConnection) -> None:
        self.ssh = ssh
        self.commands = 0
        self._lock = threading.Lock()
        session = ssh.take_session()
        self._in_master = session is not None       # the master's own session: it ends with the master
        self._proc: subprocess.Popen[bytes] | None = session or ssh.popen(SHELL_ARGV)
        self._ready = False
        self._kept: subprocess.Popen[bytes] | None = None    # a broken shell, still guarding the work folders

    def request(self, op: str, argv: Sequence[str], timeout: float) -> subprocess.CompletedProcess[bytes]:
        """Run one request; ShellBroken when the shell is gone or stops answering."""
        lines = shlex.join(argv).split("\n")
        with self._lock:
            proc = self._proc
            if proc is None or proc.stdin is None:
                raise ShellBroken("the remote shell is not running")
            deadline = time.monotonic() + timeout
            try:
                if not self._ready:
                    self._expect_ready(deadline)
                body = "\n".join(lines)
                proc.stdin.write(f"{op} {len(lines)}\n{body}\n".encode())
                proc.stdin.flush()
                rc, out_len, err_len = (int(v) for v in self._read_line(deadline).split())
                out = self._read(out_len, deadline)
                errout = self._read(err_len, deadline)
            except (OSError, ValueError, ShellBroken) as err:
                self._broken(f"{op} {argv[0] if argv else ''}: {err}")
                raise ShellBroken(str(err)) from err
            self.commands += 1
        return subprocess.CompletedProcess(list(argv), rc, out, errout)

    def _expect_ready(self, deadline: float) -> None:
        line = self._read_line(deadline)
        if line != "ready":
            raise ShellBroken(f"the remote shell did not start ({line or self._stderr() or 'no answer'})")
        self._ready = True

    def _read(self, count: int, deadline: float) -> bytes:
        proc = self._proc
        if proc is None or proc.stdout is None:
            raise ShellBroken("the remote shell is not running")
        fd = proc.stdout.fileno()
        parts: list[bytes] = []
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while count > 0:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    raise ShellBroken("no answer in time")
                data = os.read(fd, min(count, 1 << 20))
                if not data:
                    raise ShellBroken("the remote shell ended")
                parts.append(data)
                count -= len(data)
        return b"".join(parts)

    def _read_line(self, deadline: float) -> str:
        data = b""
        while not data.endswith(b"\n"):
            data += self._read(1, deadline)
        return data.decode(errors="replace").strip()

    def _stderr(self) -> str:
        proc = self._proc
        if proc is None or proc.stderr is None or proc.poll() is None:
            return ""
        return last_line(proc.stderr.read().decode(errors="replace"))

    def _broken(self, why: str) -> None:
        log.warning("remote shell on %s: %s; later commands use an ssh session each", self.ssh.where, why)
        self._kept, self._proc = self._proc, None     # its stdin stays open: closing it would clean up now

    def close(self, timeout: float = 60) -> None:
        """End of the run: the shell cleans what is left and exits (it says ``gone``). The answer is read
        up to ``gone``, not to end of file: the master connection (whose session the shell may be) ends
        after it, in :meth:`SshConnection.close`."""
        proc = self._proc or self._kept
        self._proc = self._kept = None
        if proc is None:
            return
        try:
            if proc.stdin is not None:
                proc.stdin.close()
            if not _read_until_gone(proc, time.monotonic() + timeout):
                log.warning("remote shell on %s: cleanup did not confirm", self.ssh.where)
            if not self._in_master:
                proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            log.warning("remote shell on %s: cleanup did not finish within %.0f s", self.ssh.where, timeout)
        except (OSError, ValueError) as err:
            raise errors.RemoteError(host=self.ssh.target.host, reason=f"remote shell: {err}") from err


def _read_until_gone(proc: subprocess.Popen[bytes], deadline: float) -> bool:
    """Read the shell's last output until its ``gone`` line (True) or end of file (False);
    TimeoutExpired at the deadline."""
    if proc.stdout is None:
        return False
    fd = proc.stdout.fileno()
    seen = b""
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while not seen.endswith(b"gone\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                raise subprocess.TimeoutExpired(proc.args, 0)
            data = os.read(fd, 1 << 16)
            if not data:
                return False
            seen = (seen + data)[-64:]
    return True
