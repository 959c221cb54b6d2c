"""Scheduled backup jobs: a config file per job plus systemd template units.

``JOBDIR/<job>.conf`` keeps the job's virtnbdbackup arguments and schedule.
The units are templates (``virtnbdbackup@.service`` / ``.timer``) with the
job name as instance; a job's schedule is a timer drop-in, and enabling a
job is the ``timers.target.wants`` link ``systemctl enable`` would make. All
of it is plain files, so it works (and is tested) without a running systemd;
when systemd runs, ``systemctl daemon-reload`` and start/stop follow.
"""
from __future__ import annotations

import configparser
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from virtnbd import errors

JOB_DIR = "/etc/virtnbd/jobs"
UNIT_DIR = "/etc/systemd/system"
SERVICE = "virtnbdbackup@.service"
TIMER = "virtnbdbackup@.timer"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

SERVICE_TEXT = """[Unit]
Description=virtnbd backup job %i
Documentation=man:virtnbdjob(1) man:virtnbdbackup(1)
After=libvirtd.service network-online.target
Wants=network-online.target

[Service]
Type=oneshot
ExecStart={python} -m virtnbd.cli.job --job-dir {job_dir} run %i
Nice=10
IOSchedulingClass=best-effort
IOSchedulingPriority=7
"""

TIMER_TEXT = """[Unit]
Description=Schedule of virtnbd backup job %i
Documentation=man:virtnbdjob(1)

[Timer]
OnCalendar=daily
Persistent=true
RandomizedDelaySec=30min

[Install]
WantedBy=timers.target
"""


@dataclass(frozen=True)
class Job:
    name: str
    args: tuple[str, ...]          # virtnbdbackup arguments
    schedule: str                  # systemd OnCalendar expression
    enabled: bool = False


@dataclass(frozen=True)
class Places:
    job_dir: Path = Path(JOB_DIR)
    unit_dir: Path = Path(UNIT_DIR)

    def conf(self, name: str) -> Path:
        return self.job_dir / f"{name}.conf"

    def dropin(self, name: str) -> Path:
        return self.unit_dir / f"virtnbdbackup@{name}.timer.d"

    def wants(self, name: str) -> Path:
        return self.unit_dir / "timers.target.wants" / f"virtnbdbackup@{name}.timer"


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise errors.UsageError(reason=f"job name {name!r}: letters, digits, '.', '_' and '-' only (max 64)")
    return name


def create(places: Places, name: str, args: tuple[str, ...], schedule: str) -> Job:
    check_name(name)
    if places.conf(name).exists():
        raise errors.UsageError(reason=f"job {name} exists ({places.conf(name)}); remove it first")
    check_schedule(schedule)
    _install_templates(places)
    parser = configparser.ConfigParser(interpolation=None)
    parser["job"] = {"args": shlex.join(args), "schedule": schedule}
    places.job_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    _write(places.conf(name), _ini(parser), 0o600)
    _write(places.dropin(name) / "schedule.conf", f"[Timer]\nOnCalendar=\nOnCalendar={schedule}\n", 0o644)
    return load(places, name)


def load(places: Places, name: str) -> Job:
    path = places.conf(check_name(name))
    parser = configparser.ConfigParser(interpolation=None)
    try:
        if not parser.read(path, encoding="utf-8"):
            raise errors.UsageError(reason=f"no job {name} ({path} is missing)")
        section = parser["job"]
        return Job(name, tuple(shlex.split(section["args"])), section.get("schedule", "daily"),
                   places.wants(name).is_symlink())
    except (configparser.Error, KeyError, ValueError) as err:
        raise errors.UsageError(reason=f"job file {path} is unreadable: {err}") from err


def jobs(places: Places) -> list[Job]:
    return [load(places, p.stem) for p in sorted(places.job_dir.glob("*.conf"))] if places.job_dir.is_dir() else []


def enable(places: Places, name: str) -> None:
    load(places, name)
    link = places.wants(name)
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.is_symlink():
        link.symlink_to(f"../{TIMER}")
    _systemctl("start", name)


def disable(places: Places, name: str) -> None:
    load(places, name)
    _systemctl("stop", name)
    link = places.wants(name)
    if link.is_symlink():
        link.unlink()
    _rmdir_if_empty(link.parent)


def remove(places: Places, name: str) -> None:
    disable(places, name)
    places.conf(name).unlink()
    shutil.rmtree(places.dropin(name), ignore_errors=True)
    if not jobs(places):
        for unit in (SERVICE, TIMER):
            (places.unit_dir / unit).unlink(missing_ok=True)
        _rmdir_if_empty(places.job_dir)
    _systemctl("daemon-reload", None)


def check_schedule(schedule: str) -> None:
    """The schedule as systemd reads it (``systemd-analyze calendar``, when the tool exists)."""
    if not schedule.strip() or "\n" in schedule:
        raise errors.UsageError(reason="--schedule: an OnCalendar expression, e.g. daily or 'Mon..Fri 02:00'")
    tool = shutil.which("systemd-analyze")
    if tool is None:
        return
    done = subprocess.run([tool, "calendar", schedule], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise errors.UsageError(reason=f"--schedule {schedule!r}: {done.stderr.strip() or 'not a calendar spec'}")


def _install_templates(places: Places) -> None:
    service = SERVICE_TEXT.format(python=sys.executable, job_dir=places.job_dir)
    _write(places.unit_dir / SERVICE, service, 0o644)
    _write(places.unit_dir / TIMER, TIMER_TEXT, 0o644)


def _write(path: Path, text: str, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _ini(parser: configparser.ConfigParser) -> str:
    from io import StringIO
    buf = StringIO()
    parser.write(buf)
    return buf.getvalue()


def _rmdir_if_empty(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass


def _systemctl(verb: str, name: str | None) -> None:
    """Tell a running systemd (there is none in a container or in the tests: nothing to do)."""
    if not Path("/run/systemd/system").is_dir() or shutil.which("systemctl") is None:
        return
    args = ["systemctl", verb] + ([f"virtnbdbackup@{name}.timer"] if name else [])
    subprocess.run(["systemctl", "daemon-reload"], check=False)
    subprocess.run(args, check=False)
