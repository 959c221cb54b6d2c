"""Secrets: never on the command line, never in logs, key files private.

- :func:`redact_uri` / :func:`redact_text` / :func:`redact_argv` / :func:`redact_json`:
  what a URI, a log line, an external command or a ``--json`` record looks like
  with its secrets removed (``user:pass@`` -> ``user@``; query parameters that
  carry a password, passphrase, secret or token are dropped; ``keyfile=`` paths stay).
- :class:`RedactFilter`: a logging filter that applies :func:`redact_text` to every
  record a handler emits (``cli/shell`` puts it on the console, log file and syslog).
- :func:`refuse_uri_secret`: a URI given on argv must not carry a password.
- :func:`read_password_file`: ``--password-file FILE`` (first line; the file must be private).
- :func:`check_private` / :func:`check_tls_dir`: private keys and password files not
  readable by group or others; a client certificate folder complete.
"""
from __future__ import annotations

import logging
import os
import re
import stat
import urllib.parse
from collections.abc import Iterable
from typing import Any

from virtnbd import errors

# query parameter names that carry a secret (matched case-insensitively, anywhere in the name)
_SECRET_PARAM = re.compile(r"passw|passphrase|^pass$|secret|token|credential|auth_?key|api_?key", re.IGNORECASE)
_SAFE_PARAMS = frozenset({"sshauth", "keyfile", "known_hosts", "known_hosts_verify", "no_verify", "no_tty",
                          "pkipath", "tls_priority", "authfile"})
# scheme://... up to whitespace or a quote
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")
# key=value / --key=value / "key": "value" outside URLs
_KV_IN_TEXT = re.compile(r"(?P<key>[A-Za-z_-]*(?:password|passwd|passphrase|secret|token)[A-Za-z_-]*)"
                         r"(?P<sep>\s*[=:]\s*)(?P<value>\"[^\"]*\"|'[^']*'|[^\s&,;]+)", re.IGNORECASE)
HIDDEN = "***"


def _secret_param(name: str) -> bool:
    return name.lower() not in _SAFE_PARAMS and bool(_SECRET_PARAM.search(name))


def uri_secrets(uri: str) -> list[str]:
    """What in ``uri`` is a secret: "a password in user:pass@", "query parameter password", ..."""
    found: list[str] = []
    parts = urllib.parse.urlsplit(uri)
    if parts.password is not None:
        found.append("a password in USER:PASSWORD@")
    for name, _value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True):
        if _secret_param(name):
            found.append(f"query parameter {name}")
    return found


def redact_uri(uri: str) -> str:
    """``uri`` without its secrets (unchanged when it has none or is not a URL)."""
    try:
        parts = urllib.parse.urlsplit(uri)
        has_password = parts.password is not None
    except ValueError:
        return uri
    netloc = parts.netloc
    if has_password:
        userinfo, _, hostport = netloc.rpartition("@")
        netloc = f"{userinfo.partition(':')[0]}@{hostport}"
    query = parts.query
    if query:
        kept = [p for p in query.split("&") if not _secret_param(urllib.parse.unquote(p.partition("=")[0]))]
        query = "&".join(kept)
    if netloc == parts.netloc and query == parts.query:
        return uri
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_text(text: str) -> str:
    """Every URL in ``text`` redacted, and ``password=...``-like pairs hidden."""
    if "://" in text:
        text = _URL_IN_TEXT.sub(lambda m: redact_uri(m.group(0)), text)
    return _KV_IN_TEXT.sub(lambda m: f"{m.group('key')}{m.group('sep')}{HIDDEN}", text)


def redact_argv(argv: Iterable[str]) -> list[str]:
    """An external command as it may be shown (each argument redacted)."""
    return [redact_text(str(a)) for a in argv]


def redact_json(obj: Any) -> Any:
    """A ``--json`` record with every string redacted (keys naming a secret: value hidden)."""
    if isinstance(obj, str):
        return redact_text(obj)
    if isinstance(obj, dict):
        return {k: HIDDEN if isinstance(k, str) and _secret_param(k) and v else redact_json(v)
                for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [redact_json(v) for v in obj]
    return obj


class RedactFilter(logging.Filter):
    """Put on a handler: the record's message (and traceback text) leave it redacted."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact_text(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_text(record.exc_text)
        return True


def refuse_uri_secret(uri: str, option: str) -> None:
    """UsageError when a URI given on the command line carries a secret (it shows in ps and history)."""
    found = uri_secrets(uri)
    if found:
        raise errors.UsageError(reason=f"{option} {redact_uri(uri)}: the URI carries a secret ({', '.join(found)}); "
                                       "secrets never go on the command line: put the password in a file "
                                       "(mode 0600) and give --password-file FILE")


def check_private(path: str, what: str) -> None:
    """``path`` exists and is not readable by group or others (else a one-line error with the fix)."""
    try:
        st = os.stat(path)
    except OSError as err:
        raise errors.SecretError(path=path, reason=f"{what}: {err.strerror or err}") from err
    if not stat.S_ISREG(st.st_mode):
        raise errors.SecretError(path=path, reason=f"{what}: not a regular file")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise errors.SecretError(path=path, reason=f"{what} is readable by group or others (mode {mode:04o}): "
                                                   f"chmod 600 {path}")


def read_password_file(path: str) -> str:
    """The password in ``--password-file`` (first line, without its line end)."""
    check_private(path, "password file")
    try:
        with open(path, encoding="utf-8") as f:
            line = f.readline().rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as err:
        raise errors.SecretError(path=path, reason=f"password file: {err}") from err
    if not line:
        raise errors.SecretError(path=path, reason="password file is empty (the password is its first line)")
    return line


CLIENT_FILES = ("ca-cert.pem", "client-cert.pem", "client-key.pem")


def check_tls_dir(folder: str, option: str = "--tls-cert") -> str:
    """A client certificate folder for libnbd: the three files, the key private. Returns the folder."""
    if not os.path.isdir(folder):
        raise errors.SecretError(path=folder, reason=f"{option}: no such folder (it must hold "
                                                     f"{', '.join(CLIENT_FILES)})")
    missing = [n for n in CLIENT_FILES if not os.path.isfile(os.path.join(folder, n))]
    if missing:
        raise errors.SecretError(path=folder, reason=f"{option}: missing {', '.join(missing)} (a client "
                                                     f"certificate folder holds {', '.join(CLIENT_FILES)})")
    check_private(os.path.join(folder, "client-key.pem"), "TLS client key")
    return folder
