"""One OpenSSH connection per run (ControlMaster): host key checked, every step with a timeout.

The master is our child process (it dies with us: a killed run closes the connection, and the
remote guardian of :mod:`virtnbd.remote.host` cleans up). Commands and the libvirt connection
(``qemu+ssh``: libvirt runs :attr:`SshConnection.wrapper` as its ssh) ride on it as sessions.
Host keys are checked against ``known_hosts`` with ``StrictHostKeyChecking=yes``: an unknown or
changed key stops the run before anything is read; nothing is ever added to a known_hosts file.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from virtnbd import errors
from virtnbd.remote.host import die_with_parent
from virtnbd.remote.options import RemoteOptions
from virtnbd.remote.uri import RemoteUri
from virtnbd.virt.job import pid_alive

log = logging.getLogger(__name__)

SSH = "ssh"
TEMP_PREFIXES = ("virtnbd-ssh.", "virtnbd-remote-")    # our private folders here: PREFIX<pid>.<random>


def temp_dir(prefix: str) -> str:
    """A private folder ``PREFIX<pid>.<random>`` in the temp folder (a later run removes it if we die)."""
    sweep_stale(tempfile.gettempdir())
    return tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}.")


def sweep_stale(tmp: str) -> list[str]:
    """Remove our private folders whose run is dead (SIGKILL leaves them: ssh control socket, askpass,
    forwarded NBD socket). Only folders of this user with a ``<pid>.`` of no running process."""
    removed = []
    with contextlib.suppress(OSError), os.scandir(tmp) as entries:
        for entry in entries:
            pid = _owner_pid(entry)
            if pid is None or pid_alive(pid):
                continue
            shutil.rmtree(entry.path, ignore_errors=True)
            log.info("removed %s: left by run %d, which is gone (killed?)", entry.path, pid)
            removed.append(entry.path)
    return removed


def _owner_pid(entry: os.DirEntry[str]) -> int | None:
    prefix = next((p for p in TEMP_PREFIXES if entry.name.startswith(p)), None)
    if prefix is None or not entry.is_dir(follow_symlinks=False):
        return None
    pid, dot, _ = entry.name[len(prefix):].partition(".")
    if not dot or not pid.isdigit() or entry.stat(follow_symlinks=False).st_uid != os.getuid():
        return None
    return int(pid)

    return True


def explain(stderr: str, where: str, known_hosts: str) -> str:
    """One line naming cause and fix for an ssh failure."""
    text = stderr.strip()
    if "REMOTE HOST IDENTIFICATION HAS CHANGED" in text:
        return (f"the ssh host key of {where} CHANGED (it does not match {known_hosts}): nothing was read. If the "
                f"host was reinstalled, check its new key and replace the old line (ssh-keygen -R); otherwise "
                f"someone may be intercepting the connection")
    if "Host key verification failed" in text or "No " in text and "host key is known" in text:
        return (f"the ssh host key of {where} is unknown (not in {known_hosts}): nothing was read. Check the "
                f"host's key fingerprint and add it (ssh-keyscan, or one interactive ssh), or name a known_hosts "
                f"file with --ssh-known-hosts; unknown keys are never accepted")
    if "Permission denied" in text:
        return f"ssh login refused ({last_line(text)}): the key in the URI's keyfile= must be authorized for the user"
    if "timed out" in text or "Connection refused" in text or "No route" in text or "not known" in text:
        return f"cannot reach ssh on {where} ({last_line(text)}): check the host name, port and firewall"
    return last_line(text) or "ssh failed"


def last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else ""


class SshConnection:
    """``ssh`` to the URI's user, host and port with its key; one master connection for the run."""

    def __init__(self, target: RemoteUri, options: RemoteOptions, forwards: Sequence[str] = ()) -> None:
        self.target = target
        self.options = options
        self.known_hosts = options.known_hosts or str(Path.home() / ".ssh" / "known_hosts")
        self.round_trips = 0
        self._dir = Path(temp_dir(TEMP_PREFIXES[0]))
        self.control = str(self._dir / "ctl")
        self.wrapper = str(self._dir / "ssh")
        # unix sockets on the host reached through the master (libvirt's): (local socket here, remote path)
        self.forwards = tuple((str(self._dir / f"fwd{n}.sock"), path) for n, path in enumerate(forwards))
        self._master: subprocess.Popen[bytes] | None = None
        self._session: subprocess.Popen[bytes] | None = None
        self._askpass: str | None = None
        if options.password_file:       # an encrypted key's passphrase, answered by a helper (never argv)
            self._askpass = str(self._dir / "askpass")
            with open(self._askpass, "w", encoding="utf-8") as f:
                f.write(f"#!/bin/sh\nexec head -n 1 {shlex.quote(os.path.abspath(options.password_file))}\n")
            os.chmod(self._askpass, 0o700)

    @property
    def where(self) -> str:
        port = self.target.ssh_port
        return f"{self.target.host}:{port}" if port else self.target.host

    def base_argv(self) -> list[str]:
        """ssh options every session uses (host key pinning, batch mode, timeouts, the master)."""
        argv = [SSH, "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
                "-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "UpdateHostKeys=no",
                "-o", f"ConnectTimeout={self.options.timeout}", "-o", "ServerAliveInterval=5",
                "-o", "ServerAliveCountMax=3", "-o", f"ControlPath={self.control}"]
        if self.target.keyfile:
            argv += ["-i", self.target.keyfile, "-o", "IdentitiesOnly=yes"]
        if self._askpass:       # OpenSSH keeps the FIRST value of an option: these go before BatchMode=yes
            argv[1:1] = ["-o", "BatchMode=no", "-o", "NumberOfPasswordPrompts=1"]
        return argv

    def _dest(self) -> list[str]:
        argv = ["-p", str(self.target.ssh_port)] if self.target.ssh_port else []
        if self.target.user:
            argv += ["-l", self.target.user]
        return [*argv, self.target.host]

    def open(self, command: Sequence[str] | None = None) -> SshConnection:
        """Start the master connection; with ``command``, the master's own session runs it (no second
        session to open: see :meth:`take_session`)."""
        if shutil.which(SSH) is None:
            raise errors.RemoteError(host=self.target.host, reason="the ssh client is missing (openssh-client)")
        self._write_wrapper()
        tail = ["--", shlex.join(command)] if command else []
        argv = [*self.base_argv(), "-M", "-T" if command else "-N", "-o", "ControlPersist=no",
                *(a for here, there in self.forwards for a in ("-L", f"{here}:{there}")), *self._dest(), *tail]
        log.debug("ssh: master connection to %s", self.where)
        env = None
        if self._askpass:       # the master alone asks (sessions ride on it)
            env = {**os.environ, "SSH_ASKPASS": self._askpass, "SSH_ASKPASS_REQUIRE": "force"}
        pipe = subprocess.PIPE if command else subprocess.DEVNULL
        self._master = subprocess.Popen(argv, stdin=pipe, stdout=pipe, env=env,
                                        stderr=subprocess.PIPE, preexec_fn=die_with_parent)  # noqa: PLW1509
        self._session = self._master if command else None
        self.round_trips += 1
        self._wait_master()
        return self

    def take_session(self) -> subprocess.Popen[bytes] | None:
        """The master's own session (``open(command)``), once: stdin/stdout are the command's."""
        session, self._session = self._session, None
        return session

    def _wait_master(self) -> None:
        deadline = time.monotonic() + self.options.timeout + 5
        while not os.path.exists(self.control):
            assert self._master is not None
            if self._master.poll() is not None:
                err = (self._master.stderr.read() if self._master.stderr else b"").decode(errors="replace")
                self.close()
                raise errors.RemoteError(host=self.target.host, reason=explain(err, self.where, self.known_hosts))
            if time.monotonic() > deadline:
                self.close()
                raise errors.RemoteError(host=self.target.host, reason=f"no ssh connection to {self.where} within "
                                         f"{self.options.timeout}s: check the host name, port and firewall")
            time.sleep(0.005)

    def _write_wrapper(self) -> None:
        """The ssh libvirt runs for qemu+ssh: same pinning, through the master connection."""
        text = "#!/bin/sh\nexec " + shlex.join(self.base_argv()) + ' "$@"\n'
        path = Path(self.wrapper)
        path.write_text(text)
        path.chmod(0o700)

    def argv(self, command: Sequence[str]) -> list[str]:
        """argv running ``command`` (quoted for the remote shell) on the host over the master."""
        return [*self.base_argv(), "-o", "ControlMaster=no", *self._dest(), "--", shlex.join(command)]

    def run(self, command: Sequence[str], *, timeout: float = 120, input: bytes | None = None,  # noqa: A002
            check: bool = True) -> subprocess.CompletedProcess[bytes]:
        self.round_trips += 1
        try:
            proc = subprocess.run(self.argv(command), input=input, capture_output=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired as err:
            raise errors.RemoteError(host=self.target.host, reason=f"{command[0]} did not answer within "
                                     f"{timeout:.0f}s") from err
        if proc.returncode == 255 and check:
            raise errors.RemoteError(host=self.target.host,
                                     reason=explain(proc.stderr.decode(errors="replace"), self.where, self.known_hosts))
        return proc

    def popen(self, command: Sequence[str]) -> subprocess.Popen[bytes]:
        self.round_trips += 1
        return subprocess.Popen(self.argv(command), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, preexec_fn=die_with_parent)  # noqa: PLW1509

    def close(self) -> None:
        if self._master is not None and self._master.poll() is None:
            self._master.terminate()
            try:
                self._master.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._master.kill()
                self._master.wait()
        if self._master is not None and self._master.stderr:
            self._master.stderr.close()
        shutil.rmtree(self._dir, ignore_errors=True)
