"""Secrets (virtnbd/secrets.py, cli/hostargs.py, restore/targets/remote.py): redaction, refusals, file checks."""
from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pytest

from virtnbd import errors, secrets
from virtnbd.cli import restore, shell
from virtnbd.remote.options import RemoteOptions
from virtnbd.restore.targets import remote

URI = "qemu+ssh://root@host.example:2222/system?keyfile=/root/.ssh/id&no_verify=1"


@pytest.mark.parametrize(("given", "shown"), [
    (URI, URI),                                                               # keyfile paths are fine
    ("qemu+tcp://admin:S3cret@host/system", "qemu+tcp://admin@host/system"),
    ("qemu+libssh://u:p%40ss@h:22/system?keyfile=/k&sshauth=password", "qemu+libssh://u@h:22/system?keyfile=/k&sshauth=password"),
    ("qemu+tcp://h/system?password=S3cret&x=1", "qemu+tcp://h/system?x=1"),
    ("qemu+tcp://h/system?Passphrase=S3cret", "qemu+tcp://h/system"),
    ("s3://bucket/prefix?aws_secret_access_key=S3cret&region=x", "s3://bucket/prefix?region=x"),
    ("qemu:///system", "qemu:///system"),
    ("/plain/path", "/plain/path"),
])
def test_redact_uri(given: str, shown: str) -> None:
    assert secrets.redact_uri(given) == shown
    assert "S3cret" not in secrets.redact_uri(given)


def test_redact_text_argv_and_json() -> None:
    line = "cannot connect to qemu+tcp://a:S3cret@h/system: failed; --password=S3cret token: S3cret"
    out = secrets.redact_text(line)
    assert "S3cret" not in out and "qemu+tcp://a@h/system" in out and "--password=***" in out
    argv = ["ssh", "-i", "/root/key", "-o", "UserKnownHostsFile=/k", "virsh", "-c", "qemu+tcp://u:S3cret@h/system"]
    assert secrets.redact_argv(argv) == [*argv[:-1], "qemu+tcp://u@h/system"]
    doc = {"uri": "qemu+tcp://u:S3cret@h/system", "password": "S3cret", "list": ["x?passphrase=S3cret"],
           "size": 3, "password_file": ""}
    shown = json.dumps(secrets.redact_json(doc))
    assert "S3cret" not in shown and '"size": 3' in shown and '"password_file": ""' in shown
    assert secrets.redact_text("graphics passwd='S3cret' port='5900'") == "graphics passwd=*** port='5900'"


def test_log_handlers_redact(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    shell.configure_logging("prog", verbose=True)
    logfile = tmp_path / "l.log"
    handler = shell.file_handler(str(logfile))
    logging.getLogger().addHandler(handler)
    try:
        logging.getLogger("t").info("opening %s", "qemu+tcp://u:S3cret@h/system?password=S3cret")
        try:
            raise ValueError("qemu+tcp://u:S3cret@h/system")
        except ValueError:
            logging.getLogger("t").debug("details", exc_info=True)
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    err = capsys.readouterr().err
    assert "qemu+tcp://u@h/system" in err and "S3cret" not in err
    assert "S3cret" not in logfile.read_text() and "ValueError" in logfile.read_text()
    assert "S3cret" not in shell._error_line("p", errors.LibvirtError(reason="qemu+tcp://u:S3cret@h/s"))


def test_filter_keeps_clean_records_untouched() -> None:
    record = logging.LogRecord("t", logging.INFO, __file__, 1, "n=%d", (3,), None)
    assert secrets.RedactFilter().filter(record) and record.args == (3,)


@pytest.mark.parametrize("uri", ["qemu+tcp://admin:S3cret@h/system", "qemu+ssh://h/system?password=S3cret",
                                 "qemu+libssh://h/system?keyfile=/k&passphrase=S3cret"])
def test_uri_with_a_secret_is_refused(uri: str) -> None:
    with pytest.raises(errors.UsageError, match="--password-file") as err:
        restore.parse(["-i", "/set", "-o", "/out", "-U", uri])
    assert "S3cret" not in str(err.value)


def test_password_option_names_password_file() -> None:
    with pytest.raises(errors.UsageError, match="^--password: .*--password-file FILE"):
        restore.parse(["-i", "/set", "-o", "/out", "--password", "x"])


def test_private_files(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("S3cret\nignored\n")
    pw.chmod(0o640)
    with pytest.raises(errors.SecretError, match=f"readable by group or others \\(mode 0640\\): chmod 600 {pw}"):
        secrets.read_password_file(str(pw))
    pw.chmod(0o600)
    assert secrets.read_password_file(str(pw)) == "S3cret"
    pw.write_text("\n")
    with pytest.raises(errors.SecretError, match="empty"):
        secrets.read_password_file(str(pw))
    with pytest.raises(errors.SecretError, match="No such file"):
        secrets.read_password_file(str(tmp_path / "missing"))


def test_tls_dir_checks(tmp_path: Path) -> None:
    with pytest.raises(errors.SecretError, match="no such folder"):
        secrets.check_tls_dir(str(tmp_path / "none"))
    (tmp_path / "ca-cert.pem").write_text("x")
    with pytest.raises(errors.SecretError, match="missing client-cert.pem, client-key.pem"):
        secrets.check_tls_dir(str(tmp_path))
    (tmp_path / "client-cert.pem").write_text("x")
    key = tmp_path / "client-key.pem"
    key.write_text("x")
    key.chmod(0o644)
    with pytest.raises(errors.SecretError, match=f"TLS client key is readable by group or others.*chmod 600 {key}"):
        secrets.check_tls_dir(str(tmp_path))
    key.chmod(0o600)
    assert secrets.check_tls_dir(str(tmp_path)) == str(tmp_path)


def test_ssh_target_and_askpass_order(tmp_path: Path) -> None:
    key = tmp_path / "id"
    key.write_text("k")
    key.chmod(0o600)
    target = remote.ssh_target(f"qemu+ssh://root@h.example:2222/system?keyfile={key}")
    assert (target.user, target.host, target.ssh_port, target.keyfile) == ("root", "h.example", 2222, str(key))
    pw = tmp_path / "pw"
    pw.write_text("x\n")
    link = remote.RestoreSsh(target, RemoteOptions(known_hosts="/kh", password_file=str(pw)))
    try:
        argv = link.base_argv()
        # OpenSSH keeps the first value: BatchMode=no must come before the shared BatchMode=yes
        assert argv.index("BatchMode=no") < argv.index("BatchMode=yes")
        assert "StrictHostKeyChecking=yes" in argv and "UserKnownHostsFile=/kh" in argv
        assert str(pw) not in " ".join(argv)
    finally:
        link.close()
    key.chmod(0o644)
    with pytest.raises(errors.SecretError, match="ssh private key"):
        remote.ssh_target(f"qemu+ssh://h/system?keyfile={key}")
    with pytest.raises(errors.UsageError, match="over ssh"):
        remote.ssh_target("qemu+tls://h/system")
    assert remote.shown(["sh", "-c", "a\nb", "qemu+tcp://u:S3cret@h/"]) == "sh -c <script> qemu+tcp://u@h/"


def test_restore_remote_options() -> None:
    base = ["-i", "/set", "-o", "/out/on/host"]
    o = restore.parse([*base, "-U", "qemu+ssh://root@h/system", "--tls-cert", "/c", "-I", "10.0.0.5", "-P", "11000"])
    assert o.remote is not None and o.remote.nbd_ip == "10.0.0.5" and o.remote.nbd_port == 11000 and o.remote.tls
    assert restore.parse(base).remote is None
    with pytest.raises(errors.UsageError, match="--tls-cert goes with a remote restore"):
        restore.parse([*base, "--tls-cert", "/c"])
    with pytest.raises(errors.UsageError, match="needs -o FOLDER"):
        restore.parse(["-i", "/set", "-o", "-", "-U", "qemu+ssh://h/system"])
    with pytest.raises(errors.UsageError, match="exclude each other"):
        restore.parse([*base, "-U", "qemu+ssh://h/system", "--tls-cert", "/c", "--no-tls"])


def test_json_dump_is_redacted() -> None:
    out = io.StringIO()
    json.dump(secrets.redact_json({"xml": "<graphics passwd='S3cret'/>"}), out)
    assert "S3cret" not in out.getvalue()


def test_backup_refuses_uri_secrets_and_takes_a_password_file(tmp_path: Path) -> None:
    from virtnbd.cli import backup
    base = ["-d", "vm", "-o", "/b"]
    with pytest.raises(errors.UsageError, match="--password-file") as err:
        backup.parse([*base, "-U", "qemu+tcp://admin:S3cret@h/system"])
    assert "S3cret" not in str(err.value)
    pw = tmp_path / "pw"
    pw.write_text("S3cret\n")
    pw.chmod(0o600)
    assert backup.parse([*base, "--password-file", str(pw)]).remote.password_file == str(pw)
    pw.chmod(0o604)
    with pytest.raises(errors.SecretError, match="chmod 600"):
        backup.parse([*base, "--password-file", str(pw)])
