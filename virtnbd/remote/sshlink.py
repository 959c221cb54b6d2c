"""One OpenSSH connection to a remote KVM host, taken from its libvirt URI.

- :func:`endpoint` reads user, host, port and ``keyfile=`` of a ``qemu+ssh://``,
  ``qemu+libssh://`` or ``qemu+libssh2://`` URI (None for a local URI).
- :class:`SshLink` opens ONE master connection (``ControlMaster``) with host keys checked
  against known_hosts (``StrictHostKeyChecking=yes``: an unknown or changed key fails the
  run before anything happens; ``--ssh-known-hosts FILE`` pins a file) and runs every
  remote command through it. The master runs ``cat`` on the remote with our pipe as its
  stdin: if this process dies (even SIGKILL), the pipe closes, the remote ``cat`` ends and
  the master exits once its sessions are gone; nothing waits for a clean exit of ours.
- :meth:`SshLink.libvirt_uri`: the URI libvirt itself should open so that its own ssh goes
  through the same master (qemu+ssh: ``command=`` a wrapper) or checks the same known_hosts
  file (qemu+libssh: ``known_hosts=``).

Commands are argv lists; each argument is quoted for the remote shell (no ``shell=True``).
Logged commands are redacted (virtnbd.secrets).
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
import urllib.parse
from dataclasses import dataclass

from virtnbd import errors
from virtnbd.secrets import check_private, redact_argv

log = logging.getLogger(__name__)

SSH_SCHEMES = ("ssh", "libssh", "libssh2")
CONNECT_TIMEOUT = 15


@dataclass(frozen=True)
class Endpoint:
    host: str
    user: str | None = None
    port: int | None = None
    keyfile: str | None = None
    known_hosts: str | None = None      # None: OpenSSH's own (~/.ssh/known_hosts, /etc/ssh/ssh_known_hosts)

    @property
    def target(self) -> str:
        return f"{self.user}@{self.host}" if self.user else self.host


def transport(uri: str) -> str | None:
    """``ssh`` for ``qemu+ssh://``, ``tls``, ``unix``...; None for a plain ``qemu:///``."""
    scheme = urllib.parse.urlsplit(uri).scheme
    return scheme.partition("+")[2] or None


def is_remote(uri: str | None) -> bool:
    """Does ``uri`` name another host (a host part and not a local transport)?"""
    if not uri:
        return False
    parts = urllib.parse.urlsplit(uri)
    return bool(parts.hostname) and transport(uri) not in ("unix",)


def endpoint(uri: str, known_hosts: str | None = None) -> Endpoint:
    """The ssh endpoint of an ssh-transport libvirt URI (UsageError for other transports)."""
    parts = urllib.parse.urlsplit(uri)
    if transport(uri) not in SSH_SCHEMES or not parts.hostname:
        raise errors.UsageError(reason=f"{uri}: a remote restore reaches the host over ssh: use a "
                                       "qemu+ssh://USER@HOST[:PORT]/system URI")
    query = dict(urllib.parse.parse_qsl(parts.query))
    keyfile = query.get("keyfile")
    if keyfile:
        check_private(keyfile, "ssh private key (keyfile= in the URI)")
    pinned = known_hosts or query.get("known_hosts")
    return Endpoint(host=parts.hostname, user=parts.username, port=parts.port, keyfile=keyfile, known_hosts=pinned)


def ssh_options(ep: Endpoint) -> list[str]:
    """OpenSSH options: batch mode (no prompts), host keys checked strictly, timeouts everywhere."""
    opts = ["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes", "-o", f"ConnectTimeout={CONNECT_TIMEOUT}",
            "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3", "-o", "LogLevel=ERROR"]
    if ep.known_hosts:
        opts += ["-o", f"UserKnownHostsFile={ep.known_hosts}", "-o", "GlobalKnownHostsFile=/dev/null"]
    if ep.port:
        opts += ["-p", str(ep.port)]
    if ep.keyfile:
        opts += ["-i", ep.keyfile, "-o", "IdentitiesOnly=yes"]
    return opts


def remote_command(argv: list[str]) -> str:
    """argv quoted for the remote login shell (ssh joins its arguments with spaces)."""
    return " ".join(shlex.quote(a) for a in argv)


def shown(command: list[str]) -> str:
    """A remote command as logged: secrets removed, inline scripts shortened."""
    return " ".join("<script>" if "\n" in a else a for a in redact_argv(command))


def _why(stderr: str, ep: Endpoint) -> str:
    text = stderr.strip().splitlines()
    last = text[-1] if text else "ssh failed"
    joined = " ".join(text)
    if "Host key verification failed" in joined or "REMOTE HOST IDENTIFICATION HAS CHANGED" in joined:
        where = ep.known_hosts or "~/.ssh/known_hosts"
        return (f"host key of {ep.host} unknown or changed (checked against {where}); verify the key and add it "
                f"(ssh-keyscan) or name the right file with --ssh-known-hosts")
    if "Permission denied" in joined:
        return f"ssh login as {ep.target} refused: {last}"
    return last


class SshLink:
    """A master ssh connection; ``run``/``popen`` go through it. Context manager."""

    def __init__(self, ep: Endpoint, password_file: str | None = None) -> None:
        self.ep = ep
        self._dir = tempfile.mkdtemp(prefix="virtnbd-ssh-")
        self.control = os.path.join(self._dir, "ctl")
        self._master: subprocess.Popen[bytes] | None = None
        self._env: dict[str, str] | None = None
        if password_file:
            self._env = self._askpass(password_file)

    def _askpass(self, password_file: str) -> dict[str, str]:
        """``--password-file``: OpenSSH asks a helper that prints the file's first line (never argv)."""
        path = os.path.join(self._dir, "askpass")
        with open(path, "w", encoding="utf-8") as f:
            f.write(f"#!/bin/sh\nexec head -n 1 {shlex.quote(os.path.abspath(password_file))}\n")
        os.chmod(path, 0o700)
        return {**os.environ, "SSH_ASKPASS": path, "SSH_ASKPASS_REQUIRE": "force"}

    def base(self) -> list[str]:
        # OpenSSH keeps the FIRST value of an option: the askpass set-up must come before the defaults
        batch = ["-o", "BatchMode=no", "-o", "NumberOfPasswordPrompts=1"] if self._env else []
        return ["ssh", *batch, *ssh_options(self.ep), "-o", f"ControlPath={self.control}"]

    def __enter__(self) -> SshLink:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _start(self) -> None:
        argv = [*self.base(), "-o", "ControlMaster=yes", "-o", "ControlPersist=no", self.ep.target,
                "exec cat >/dev/null"]
        log.debug("ssh master: %s", " ".join(redact_argv(argv)))
        self._master = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, start_new_session=True, env=self._env)
        deadline = time.monotonic() + CONNECT_TIMEOUT + 5
        while not self._ready():
            if self._master.poll() is not None:
                err = self._master.stderr.read().decode(errors="replace") if self._master.stderr else ""
                raise errors.RemoteError(host=self.ep.host, reason=_why(err, self.ep))
            if time.monotonic() > deadline:
                raise errors.RemoteError(host=self.ep.host, reason=f"no ssh connection within {CONNECT_TIMEOUT} s")
            time.sleep(0.05)

    def _ready(self) -> bool:
        if not os.path.exists(self.control):
            return False
        check = subprocess.run([*self.base(), "-O", "check", self.ep.target], capture_output=True, check=False)
        return check.returncode == 0

    def argv(self, command: list[str]) -> list[str]:
        return [*self.base(), "-o", "ControlMaster=no", self.ep.target, remote_command(command)]

    def run(self, command: list[str], timeout: float = 120, stdin: bytes | None = None) -> str:
        """Run ``command`` on the remote; its stdout, or RemoteError naming its last stderr line."""
        log.debug("remote %s: %s", self.ep.host, shown(command))
        try:
            done = subprocess.run(self.argv(command), input=stdin, capture_output=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired as err:
            raise errors.RemoteError(host=self.ep.host, reason=f"{command[0]}: no answer within {timeout:.0f} s") \
                from err
        if done.returncode != 0:
            raise errors.RemoteError(host=self.ep.host, reason=f"{command[0]}: "
                                     f"{_why(done.stderr.decode(errors='replace'), self.ep)}")
        return done.stdout.decode(errors="replace")

    def popen(self, command: list[str]) -> subprocess.Popen[bytes]:
        """A long-running remote command with pipes (its stdin closing is its signal to end)."""
        log.debug("remote %s: %s", self.ep.host, shown(command))
        return subprocess.Popen(self.argv(command), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True)

    def forward(self, local_socket: str, remote_port: int, remote_host: str = "127.0.0.1") -> None:
        """Forward a local unix socket to REMOTE_HOST:REMOTE_PORT as seen from the remote host."""
        spec = f"{local_socket}:{remote_host}:{remote_port}"
        done = subprocess.run([*self.base(), "-O", "forward", "-L", spec, self.ep.target],
                              capture_output=True, timeout=30, check=False)
        if done.returncode != 0:
            raise errors.RemoteError(host=self.ep.host, reason=f"ssh forward to {remote_host}:{remote_port}: "
                                     f"{_why(done.stderr.decode(errors='replace'), self.ep)}")

    def libvirt_uri(self, uri: str) -> str:
        """``uri`` for libvirt.open, its own ssh going through this link's master / known_hosts."""
        parts = urllib.parse.urlsplit(uri)
        query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
        names = {k for k, _ in query}
        if transport(uri) == "ssh" and "command" not in names:
            query.append(("command", self._wrapper()))
        elif transport(uri) in ("libssh", "libssh2") and self.ep.known_hosts and "known_hosts" not in names:
            query.append(("known_hosts", self.ep.known_hosts))
        return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query, safe="/:,")))

    def _wrapper(self) -> str:
        path = os.path.join(self._dir, "ssh")
        body = "#!/bin/sh\nexec " + " ".join(shlex.quote(a) for a in [*self.base(), "-o", "ControlMaster=no"]) + \
            ' "$@"\n'
        with open(path, "w", encoding="utf-8") as f:
            f.write(body)
        os.chmod(path, 0o700)
        return path

    def close(self) -> None:
        master, self._master = self._master, None
        if master is not None:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                subprocess.run([*self.base(), "-O", "exit", self.ep.target], capture_output=True, timeout=10,
                               check=False)
            if master.stdin:
                with contextlib.suppress(OSError):
                    master.stdin.close()
            try:
                master.wait(timeout=10)
            except subprocess.TimeoutExpired:
                master.kill()
                master.wait()
            if master.stderr:
                master.stderr.close()
        shutil.rmtree(self._dir, ignore_errors=True)
