"""RemoteHost: the :class:`~virtnbd.remote.host.Host` of a domain on another KVM host, over one ssh connection.

Its work folder is made by a *guardian*: one remote shell that creates ``SCRATCH/virtnbd.<pid>.<rand>``,
prints it, and waits on its stdin. When the run ends - or dies: the ssh master is our child and ends
with us, which closes the guardian's stdin - the guardian stops the qemu-nbd servers whose pid files
are in that folder (and any qemu-nbd naming a pid file there that it had not written yet), aborts a
backup job still using it, and removes it (a qemu-nbd started later cannot write its pid file and exits).
So nothing is left on the remote after a run, a failed run or a SIGKILLed one.
"""
from __future__ import annotations

import contextlib
import logging
import os
import subprocess
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from virtnbd import errors
from virtnbd.remote.host import ExportSpec, RemoteFacts, nbd_argv, untar
from virtnbd.remote.options import PORT_RANGE, RemoteOptions
from virtnbd.remote.rshell import STOP_PID, RemoteShell, ShellBroken
from virtnbd.remote.ssh import SshConnection, last_line
from virtnbd.source.nbdsource import Address, TcpAddress
from virtnbd.virt.xmlbuild import TcpServer

log = logging.getLogger(__name__)

START_NBD = r"""
command -v qemu-nbd >/dev/null 2>&1 || { echo "qemu-nbd: command not found" >&2; exit 127; }
exec qemu-nbd "$@"
"""

TLS_DIR = r"""
for k in backup_tls_x509_cert_dir default_tls_x509_cert_dir; do
  v=$(sed -n "s/^[[:space:]]*$k[[:space:]]*=[[:space:]]*\"\(.*\)\".*/\1/p" /etc/libvirt/qemu.conf 2>/dev/null | tail -1)
  [ -n "$v" ] && { echo "$v"; exit 0; }
done
echo /etc/pki/qemu
"""

IN_USE = "Address already in use"
TLS_HINTS = ("tls", "x509", "cert", "credentials")


def ports(first: int) -> range:
    """The ports a run tries, in order: FIRST..FIRST+63 (parallel runs take the next free one)."""
    return range(first, first + PORT_RANGE)


class RemoteHost:
    def __init__(self, ssh: SshConnection, options: RemoteOptions) -> None:
        self.ssh = ssh
        self.options = options
        self.name = ssh.target.host
        self.dial = options.nbd_ip or ssh.target.host     # the name certificates are checked against
        self.report = RemoteFacts(host=self.name, tls=options.tls)
        self.shell = RemoteShell(ssh)           # starts now: its login overlaps the libvirt connect

    def close(self) -> None:
        self.shell.close()

    # -- commands and files -----------------------------------------------------------
    def _exec(self, argv: Sequence[str], timeout: float) -> subprocess.CompletedProcess[bytes]:
        """A command on the host: through the run's shell, or (shell broken) an ssh session of its own."""
        try:
            return self.shell.request("run", argv, timeout)
        except ShellBroken:
            return self.ssh.run(argv, timeout=timeout)

    def run(self, argv: Sequence[str], timeout: float) -> subprocess.CompletedProcess[str]:
        proc = self._exec(argv, timeout)
        return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(errors="replace"),
                                           proc.stderr.decode(errors="replace"))

    def read_file(self, path: str) -> bytes:
        proc = self._exec(["cat", "--", path], timeout=120)
        if proc.returncode != 0:
            raise OSError(f"{self.name}:{path}: {last_line(proc.stderr.decode(errors='replace'))}")
        return proc.stdout

    def fetch_tree(self, path: str, dest: Path) -> bool:
        proc = self._exec(["sh", "-c", 'test -d "$1" || exit 3; exec tar -C "$1" -cf - .', "sh", path], 300)
        if proc.returncode == 3:
            return False
        if proc.returncode != 0:
            raise OSError(f"{self.name}:{path}: {last_line(proc.stderr.decode(errors='replace'))}")
        untar(proc.stdout, dest)
        return True

    # -- the work folder ----------------------------------------------------------------
    @contextlib.contextmanager
    def work_dir(self, scratchdir: str, domain: str) -> Iterator[str]:
        """``SCRATCH/virtnbd.<pid>.<rand>`` on the host, made and guarded by the run's shell."""
        try:
            proc = self.shell.request("work", [scratchdir, domain, str(os.getpid())], 60)
        except ShellBroken as err:
            raise errors.RemoteError(host=self.name, reason=f"no remote shell for the work folder: {err}") from err
        line = proc.stdout.decode(errors="replace").strip()
        if proc.returncode != 0 or not line.startswith("/"):
            raise errors.RemoteError(host=self.name, reason=f"cannot create a work folder in {scratchdir}: "
                                     f"{last_line(proc.stderr.decode(errors='replace')) or 'no answer'} "
                                     "(--scratchdir names a folder on the host)")
        log.debug("remote work folder %s:%s", self.name, line)
        try:
            yield line
        finally:
            with contextlib.suppress(ShellBroken):      # a broken shell cleans up when the run ends
                self.shell.request("release", [line], 60)

    # -- NBD ----------------------------------------------------------------------------
    def _client(self, port: int) -> TcpAddress:
        address = TcpAddress(self.dial, port, self.options.tls_dir if self.options.tls else None,
                             float(self.options.timeout))
        self.report.nbd.append(str(address))
        return address

    def begin_job(self, begin: Callable[[str | TcpServer], None], workdir: str,
                  socketfile: str | None) -> Address:
        """Start the job on a free port: a port in use is retried on the next one."""
        for port in ports(self.options.first_port):
            try:
                begin(TcpServer(self.dial, port, self.options.tls))
            except errors.LibvirtError as err:
                if IN_USE in err.reason:
                    log.info("port %d in use on %s: trying another", port, self.name)
                    continue
                raise _job_error(err, self.name) from err
            return self._client(port)
        raise errors.RemoteError(host=self.name, reason=f"no free port in {self.options.first_port}.."
                                 f"{self.options.first_port + 63} for the NBD server (--nbd-port)")

    def _server_tls_dir(self) -> str:
        return self._exec(["sh", "-c", TLS_DIR], 60).stdout.decode().strip()

    def _start_nbd(self, spec: ExportSpec, workdir: str, tls_dir: str | None) -> int:
        for port in ports(self.options.first_port):
            argv = [*nbd_argv(spec), "--fork", f"--pid-file={workdir}/{spec.target}.pid",
                    f"--bind={self.dial}", f"--port={port}"]
            if tls_dir:
                argv += ["--object", f"tls-creds-x509,id=tls0,dir={tls_dir},endpoint=server", "--tls-creds=tls0"]
            proc = self._exec(["sh", "-c", START_NBD, "qemu-nbd", *argv[1:], spec.path], 60)
            err = proc.stderr.decode(errors="replace")
            if proc.returncode == 0:
                return port
            if proc.returncode == 127:
                raise errors.RemoteError(host=self.name, reason="qemu-nbd is missing on the host (offline backups "
                                         "of a shut-off domain export its images with it): install qemu-utils there")
            if IN_USE not in err:
                raise errors.NbdError(export=spec.target, reason=f"qemu-nbd on {self.name} failed: {last_line(err)}")
        raise errors.RemoteError(host=self.name, reason="no free port for qemu-nbd (--nbd-port)")

    @contextlib.contextmanager
    def exports(self, specs: Sequence[ExportSpec], workdir: str) -> Iterator[dict[str, Address]]:
        """qemu-nbd per disk on the host (TLS with the host's backup certificate); the guardian stops them."""
        tls_dir = self._server_tls_dir() if self.options.tls else None
        started: list[str] = []
        try:
            found: dict[str, Address] = {}
            for spec in specs:
                found[spec.target] = self._client(self._start_nbd(spec, workdir, tls_dir))
                started.append(f"{workdir}/{spec.target}.pid")
            yield found
        finally:
            if started:
                self._stop_nbd(started)

    def _stop_nbd(self, pidfiles: list[str]) -> None:
        """Stop the exports now (the domain may start right after the run); the guardian does it too."""
        script = STOP_PID + 'for f in "$@"; do p=$(cat "$f" 2>/dev/null) || continue; stop_pid "$p"; rm -f "$f"; done'
        with contextlib.suppress(errors.RemoteError):
            self._exec(["sh", "-c", script, "stop", *pidfiles], 60)

    def facts(self) -> RemoteFacts:
        self.report.ssh_round_trips = self.ssh.round_trips
        self.report.remote_commands = self.shell.commands
        return self.report


def _job_error(err: errors.LibvirtError, host: str) -> errors.VirtnbdError:
    text = err.reason.lower()
    if any(h in text for h in TLS_HINTS):
        return errors.RemoteError(host=host, reason=f"TLS for backup jobs is not set up on the host ({err.reason}): "
                                  "put backup_tls_x509_cert_dir (server certificate) and backup_tls_x509_verify = 1 "
                                  "into its /etc/libvirt/qemu.conf and restart libvirtd there, or run with --no-tls")
    if "cannot assign requested address" in text or "failed to resolve" in text or "name or service" in text:
        return errors.RemoteError(host=host, reason=f"the host cannot listen on the URI's host name ({err.reason}): "
                                  "name an address of the host reachable from here with --nbd-ip")
    return err
