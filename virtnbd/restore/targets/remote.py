"""Restore onto another host: the image is made there and written through a remote qemu-nbd over TLS.

``virtnbdrestore -U qemu+ssh://USER@HOST/system -o /path/on/HOST`` opens one :class:`RemoteHost`
(one ssh master connection, host key checked) for the run. Each disk is a :class:`RemoteTarget`
(spec ``remote:/path/on/HOST/sda.qcow2``):

- a supervisor shell script runs on the host for the disk's whole life, in one ssh session
  whose stdin is our pipe: it creates ``<image>.partial`` (``qemu-img create`` with the
  backup-time options), starts ``qemu-nbd --fork`` bound to ONE address (the host's
  loopback unless ``--nbd-ip``) with TLS (``tls-creds-x509 endpoint=server``: the client
  must show a certificate of the same CA) on the first free port of a list, and says
  ``ready PORT``;
- we reach it through an ssh forward (a unix socket in a private folder here -> the host's
  127.0.0.1:PORT), or straight at ``--nbd-ip:PORT``, and write with libnbd over TLS using
  the client certificates of ``--tls-cert DIR`` (one connection per worker);
- ``commit`` flushes, then sends ``commit``: the script stops qemu-nbd (pid file + kill,
  waits for it to exit), renames the image to its final name (never over an existing
  file) and answers ``committed``;
- anything else — an error, ``abort``, our process killed (even SIGKILL: the pipe closes,
  the script reads end-of-file), the ssh connection lost — makes the script kill qemu-nbd
  and remove the partial image and its own temp folder. Nothing is left on the host
  that looks complete.
"""
from __future__ import annotations

import contextlib
import logging
import os
import random
import shutil
import subprocess
import threading
from collections.abc import Iterator
from typing import Any

from virtnbd import errors, secrets
from virtnbd.remote import options as remote_options
from virtnbd.remote import session as remote_session
from virtnbd.remote import uri as uri_mod
from virtnbd.remote.rshell import STOP_PID
from virtnbd.remote.ssh import TEMP_PREFIXES, SshConnection, explain, temp_dir
from virtnbd.restore.options import RemoteOptions
from virtnbd.restore.targets.base import TargetRequest
from virtnbd.restore.targets.qcow2 import Qcow2Target, ServedImage, create_options
from virtnbd.restore.targets.raw import temp_name

log = logging.getLogger(__name__)

SCHEME = "remote"
PORTS = (10900, 11900)          # candidate range for the remote qemu-nbd
PORT_TRIES = 8
READY_TIMEOUT = 60.0
COMMIT_TIMEOUT = 120.0


NEEDS_CERT = ("a remote restore writes over NBD with TLS: give --tls-cert DIR (ca-cert.pem, client-cert.pem, "
              "client-key.pem signed by the host's CA), or --no-tls")


# The supervisor. $1 image.partial $2 final $3 format $4 size $5 create -o $6 address $7 ports
# $8 server TLS dir ("" = from qemu.conf, "-" = no TLS) $9 connections.
SUPERVISOR = STOP_PID + r'''
img=$1 final=$2 fmt=$3 size=$4 opts=$5 addr=$6 ports=$7 tlsdir=$8 conns=$9
d=$(mktemp -d "${TMPDIR:-/tmp}/virtnbd-restore.XXXXXX") || exit 1
stop() {
  [ -s "$d/pid" ] || return 0
  stop_pid "$(cat "$d/pid")"; rm -f "$d/pid"
}
fail() { trap - EXIT HUP INT TERM PIPE; stop; rm -f "$img"; rm -rf "$d"; exit 1; }
trap fail EXIT HUP INT TERM PIPE
conf() {
  sed -n "s/^[[:space:]]*$1[[:space:]]*=[[:space:]]*\"\(.*\)\".*/\1/p" /etc/libvirt/qemu.conf 2>/dev/null | tail -n 1
}
if [ -z "$tlsdir" ]; then tlsdir=$(conf backup_tls_x509_cert_dir); fi
if [ -z "$tlsdir" ]; then tlsdir=$(conf default_tls_x509_cert_dir); fi
if [ -z "$tlsdir" ]; then tlsdir=/etc/pki/qemu; fi
command -v qemu-nbd >/dev/null || { echo "qemu-nbd not found on the host (install qemu-utils)" >&2; exit 1; }
if [ "$tlsdir" != - ] && [ ! -r "$tlsdir/server-cert.pem" ]; then
  echo "no server certificate $tlsdir/server-cert.pem on the host" \
    "(set backup_tls_x509_cert_dir in qemu.conf, or give --nbd-tls-dir)" >&2; exit 1
fi
if [ -e "$final" ] || [ -L "$final" ]; then echo "$final exists already, refusing to overwrite" >&2; exit 1; fi
mkdir -p -- "$(dirname -- "$final")" 2>"$d/err" || { cat "$d/err" >&2; exit 1; }
rm -f "$img"
qemu-img create -q -f "$fmt" ${opts:+-o "$opts"} "$img" "$size" 2>"$d/err" || { cat "$d/err" >&2; exit 1; }
chmod 600 "$img"
set -- --fork --pid-file "$d/pid" -f "$fmt" --cache=writeback --aio=threads -e "$conns" -x disk -b "$addr"
if [ "$tlsdir" != - ]; then
  set -- "$@" --object "tls-creds-x509,id=tls0,dir=$tlsdir,endpoint=server,verify-peer=on" --tls-creds tls0
fi
for port in $ports; do
  if qemu-nbd "$@" -p "$port" "$img" 2>"$d/err"; then echo "ready $port"; break; fi
  grep -q "in use" "$d/err" || { echo "qemu-nbd: $(tail -n 1 "$d/err")" >&2; exit 1; }
  port=
done
[ -n "$port" ] || { echo "qemu-nbd: no free port among $ports" >&2; exit 1; }
read -r cmd || exit 1
[ "$cmd" = commit ] || exit 1
stop
if [ -e "$final" ] || [ -L "$final" ]; then echo "$final appeared meanwhile, refusing to overwrite" >&2; exit 1; fi
sync -f "$img" 2>/dev/null || sync
mv -- "$img" "$final" || exit 1
trap - EXIT HUP INT TERM PIPE
rm -rf "$d"
echo committed
'''


class RestoreSsh(SshConnection):
    """The backup side's ssh connection (virtnbd/remote/ssh.py; ``--password-file`` answers an
    encrypted key's passphrase there) plus what a restore needs: a checked ``check_run`` and an
    ``-O forward`` of a local unix socket."""

    def check_run(self, command: list[str], stdin: bytes | None = None) -> str:
        log.debug("remote %s: %s", self.target.host, shown(command))
        done = self.run(command, input=stdin)
        if done.returncode != 0:
            lines = done.stderr.decode(errors="replace").strip().splitlines()
            raise errors.RemoteError(host=self.target.host,
                                     reason=f"{command[0]}: {lines[-1] if lines else f'exit {done.returncode}'}")
        return done.stdout.decode(errors="replace")

    def forward(self, local_socket: str, remote_port: int, remote_host: str = "127.0.0.1") -> None:
        """Forward a local unix socket to REMOTE_HOST:REMOTE_PORT as seen from the host."""
        spec = f"{local_socket}:{remote_host}:{remote_port}"
        done = subprocess.run([*self.base_argv(), "-O", "forward", "-L", spec, *self._dest()],
                              capture_output=True, timeout=30, check=False)
        if done.returncode != 0:
            raise errors.RemoteError(host=self.target.host, reason=f"ssh forward to {remote_host}:{remote_port}: "
                                     f"{explain(done.stderr.decode(errors='replace'), self.where, self.known_hosts)}")


def shown(command: list[str]) -> str:
    """A remote command as logged: secrets removed, inline scripts shortened."""
    return " ".join("<script>" if "\n" in a else a for a in secrets.redact_argv(command))


def ssh_target(uri: str) -> uri_mod.RemoteUri:
    """The ssh-reachable host of ``uri`` (UsageError for local URIs and non-ssh transports)."""
    target = uri_mod.parse(uri)
    if target is None or target.transport not in uri_mod.SSH_TRANSPORTS:
        raise errors.UsageError(reason=f"{secrets.redact_uri(uri)}: a remote restore reaches the host over ssh: "
                                       "use a qemu+ssh://USER@HOST[:PORT]/system URI")
    if target.keyfile:
        secrets.check_private(target.keyfile, "ssh private key (keyfile= in the URI)")
    return target


class RemoteHost:
    """One remote host for a restore run: the ssh connection, the TLS settings, folder and file helpers."""

    def __init__(self, options: RemoteOptions, link: RestoreSsh, target: uri_mod.RemoteUri) -> None:
        self.options = options
        self.link = link
        self.target = target
        self.name = target.host

    def make_folder(self, path: str) -> None:
        """Nothing now: the disk helpers and :meth:`write_file` make their folder (one ssh session less)."""

    def write_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        """A small file on the host, written under a temp name and renamed (its folder made if needed)."""
        script = ('umask 077; mkdir -p -- "$(dirname -- "$1")" && cat > "$1.tmp" && chmod "$2" "$1.tmp" && '
                  'mv -- "$1.tmp" "$1"')
        self.link.check_run(["sh", "-c", script, "sh", path, f"{mode:o}"], stdin=data)

    def libvirt_uri(self) -> tuple[str, ...]:
        """The libvirt URIs to try for ``-D``: the master's forward of the host's socket, then qemu+ssh."""
        return remote_session.libvirt_uris(self.target, self.link)

    def target_spec(self, output: str, disk: str, fmt: str) -> str:
        """The target spec of a disk restored into ``output`` on this host."""
        return name_in(output, disk, fmt)

    def popen(self, command: list[str]) -> subprocess.Popen[bytes]:
        log.debug("remote %s: %s", self.name, shown(command))
        return self.link.popen(command)


@contextlib.contextmanager
def open_host(options: RemoteOptions, password_file: str | None = None) -> Iterator[RemoteHost]:
    if options.tls_cert:
        secrets.check_tls_dir(options.tls_cert)
    if not options.tls:
        log.warning("--no-tls: the restored disks cross the network UNENCRYPTED and the host's qemu-nbd accepts "
                    "any client on %s", options.nbd_ip or "its loopback")
    target = ssh_target(options.uri)
    ssh_options = remote_options.RemoteOptions(tls=options.tls, known_hosts=options.known_hosts,
                                               tls_dir=options.tls_cert or remote_options.DEFAULT_TLS_DIR,
                                               password_file=password_file)
    link = RestoreSsh(target, ssh_options, remote_session.forwarded_sockets(target))
    try:
        link.open()
        yield RemoteHost(options, link, target)
    finally:
        link.close()


def spec_path(spec: str) -> str:
    """The path on the host of a ``remote:PATH`` spec."""
    return spec.partition(":")[2]


def name_in(output: str, disk: str, fmt: str) -> str:
    return f"{SCHEME}:{os.path.join(output, f'{disk}.{fmt}')}"


def _ports(first: int | None) -> list[int]:
    if first is not None:
        return [first + i for i in range(PORT_TRIES)]
    return random.SystemRandom().sample(range(*PORTS), PORT_TRIES)


class RemoteTarget(Qcow2Target):
    """Qcow2Target's NBD writing, against a qemu-nbd on the remote host (see the module doc)."""

    def __init__(self, request: TargetRequest) -> None:  # noqa: D107 (documented above)
        host = request.extra.get("remote_host")
        if not isinstance(host, RemoteHost):
            raise errors.UsageError(reason=f"{request.spec}: a remote target needs -U qemu+ssh://HOST/...")
        self.host = host
        self.name = request.spec
        self.path = spec_path(request.spec)
        self.tmp = temp_name(self.path)
        self.virtual_size = request.virtual_size
        self.workers = max(1, request.workers)
        self.bytes_written = 0
        self.zero_bytes = 0
        self._lock = threading.Lock()
        self._sockdir: str | None = None
        self.sock = ""
        # the server is remote: ServedImage only writes through our connections to it
        self.image = ServedImage(self.tmp, self.workers, label=self.path, connect=self._connect)
        self._supervisor: subprocess.Popen[bytes] | None = None
        self.port = 0
        try:
            self._start_remote(request)
        except BaseException:
            self.abort()
            raise

    def _fail(self, reason: str) -> errors.RemoteError:
        return errors.RemoteError(host=self.host.name, reason=f"{self.path}: {reason}")

    def _start_remote(self, request: TargetRequest) -> None:
        opts = create_options(request.image_info) if request.format == "qcow2" else []
        if request.preallocate:
            opts.append("preallocation=metadata" if request.format == "qcow2" else "preallocation=full")
        o = self.host.options
        if o.tls and not o.tls_cert:
            raise errors.UsageError(reason=NEEDS_CERT)
        tlsdir = "-" if not o.tls else (o.server_tls_dir or "")
        args = [self.tmp, self.path, request.format, str(self.virtual_size), ",".join(opts),
                o.nbd_ip or "127.0.0.1", " ".join(map(str, _ports(o.nbd_port))), tlsdir, str(self.workers + 1)]
        self._supervisor = self.host.popen(["sh", "-c", SUPERVISOR, "sh", *args])
        line = self._read_line(READY_TIMEOUT)
        if not line.startswith("ready "):
            raise self._fail(self._supervisor_error() or "the remote restore helper ended without starting qemu-nbd")
        self.port = int(line.split()[1])
        log.debug("%s: remote qemu-nbd on %s:%d", self.name, o.nbd_ip or "127.0.0.1", self.port)
        if o.nbd_ip is None:
            self._sockdir = temp_dir(TEMP_PREFIXES[1])
            self.sock = os.path.join(self._sockdir, "nbd.sock")
            self.host.link.forward(self.sock, self.port)
        else:
            self.sock = f"{o.nbd_ip}:{self.port}"
        self.image.sock = self.sock

    def _read_line(self, timeout: float) -> str:
        """One line of the supervisor's stdout (empty at end of file), waiting at most ``timeout``."""
        proc = self._supervisor
        if proc is None or proc.stdout is None:
            return ""
        box: list[bytes] = []
        reader = threading.Thread(target=lambda: box.append(proc.stdout.readline()) if proc.stdout else None,
                                  daemon=True)
        reader.start()
        reader.join(timeout)
        if reader.is_alive():
            raise self._fail(f"the remote restore helper did not answer within {timeout:.0f} s")
        return box[0].decode(errors="replace").strip() if box else ""

    def _supervisor_error(self) -> str:
        proc = self._supervisor
        if proc is None or proc.stderr is None:
            return ""
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
        lines = proc.stderr.read().decode(errors="replace").strip().splitlines()
        return lines[-1] if lines else ""

    def _connect(self, h: Any) -> None:
        o = self.host.options
        if o.tls:
            h.set_tls(self.image._nbd.TLS_REQUIRE)
            h.set_tls_certificates(o.tls_cert)
        h.set_export_name("disk")
        if o.nbd_ip is None:
            h.connect_unix(self.sock)
        else:
            h.connect_tcp(o.nbd_ip, str(self.port))

    # -- Target ---------------------------------------------------------
    def commit(self) -> None:
        try:
            self.image.finish()
            self._send("commit\n")
            line = self._read_line(COMMIT_TIMEOUT)
            if line != "committed":
                raise self._fail(self._supervisor_error() or "the remote restore helper failed to finish the image")
            self._end_supervisor()
        except errors.StorageError as err:
            self.abort()
            raise self._fail(f"nbd flush: {err.fields.get('reason', err)}") from err
        except BaseException:
            self.abort()
            raise

    def _send(self, text: str) -> None:
        proc = self._supervisor
        if proc is None or proc.stdin is None:
            raise self._fail("the remote restore helper is gone")
        try:
            proc.stdin.write(text.encode())
            proc.stdin.flush()
        except OSError as err:
            raise self._fail("the remote restore helper is gone") from err

    def abort(self) -> None:
        self.image.stop()
        self._end_supervisor()

    def _end_supervisor(self) -> None:
        """Closing its stdin is the supervisor's signal to clean up (no-op after ``committed``)."""
        proc, self._supervisor = self._supervisor, None
        if proc is not None:
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._sockdir is not None:
            shutil.rmtree(self._sockdir, ignore_errors=True)
            self._sockdir = None


def open_remote(request: TargetRequest) -> RemoteTarget:
    return RemoteTarget(request)
