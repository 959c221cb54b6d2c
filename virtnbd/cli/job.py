"""``virtnbdjob``: create, list, enable, disable, remove and run scheduled backup jobs."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from virtnbd import __version__, errors
from virtnbd.cli.shell import OneLineParser, run_main
from virtnbd.ops import jobs

PROG = "virtnbdjob"


@dataclass(frozen=True)
class JobOptions:
    command: str
    name: str | None
    args: tuple[str, ...]
    schedule: str
    places: jobs.Places
    verbose: bool = False
    strict: bool = False


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, usage="%(prog)s [options] COMMAND [NAME] [-- VIRTNBDBACKUP-ARGUMENTS]",
                      description="Scheduled virtnbdbackup jobs: a config file per job and systemd "
                                  "template units (virtnbdbackup@JOB.timer).",
                      epilog="example: virtnbdjob create nightly --schedule '*-*-* 02:00' -- --all -l auto -o /backup")
    p.add_argument("command", choices=("create", "list", "enable", "disable", "remove", "run"))
    p.add_argument("name", nargs="?", help="job name (letters, digits, . _ -)")
    p.add_argument("--schedule", default="daily", help="create: systemd OnCalendar expression (default daily)")
    p.add_argument("--job-dir", default=jobs.JOB_DIR, help=f"job config files (default {jobs.JOB_DIR})")
    p.add_argument("--unit-dir", default=jobs.UNIT_DIR, help=f"systemd unit folder (default {jobs.UNIT_DIR})")
    p.add_argument("-v", "--verbose", action="store_true", help="debug output")
    p.add_argument("-V", "--version", action="version", version=f"%(prog)s {__version__}")
    return p


def parse(argv: Sequence[str]) -> JobOptions:
    argv = list(argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    a = build_parser().parse_args(argv[:cut])
    args = tuple(argv[cut + 1:])            # create: the virtnbdbackup arguments
    if a.command != "list" and not a.name:
        raise errors.UsageError(reason=f"{a.command} needs a job name")
    if a.command == "create":
        if not args:
            raise errors.UsageError(reason="create needs the virtnbdbackup arguments after --")
        from virtnbd.cli import backup
        backup.parse_run(args)               # the job's options are checked now, not at 2 a.m.
    elif args:
        raise errors.UsageError(reason=f"{a.command} takes no virtnbdbackup arguments")
    return JobOptions(a.command, a.name, args, a.schedule, jobs.Places(Path(a.job_dir), Path(a.unit_dir)),
                      verbose=a.verbose)


def _run(o: JobOptions) -> None:
    if o.command == "list":
        for job in jobs.jobs(o.places):
            state = "enabled" if job.enabled else "disabled"
            print(f"{job.name}\t{state}\t{job.schedule}\tvirtnbdbackup {' '.join(job.args)}")
        return
    assert o.name is not None
    if o.command == "create":
        jobs.create(o.places, o.name, o.args, o.schedule)
    elif o.command == "enable":
        jobs.enable(o.places, o.name)
    elif o.command == "disable":
        jobs.disable(o.places, o.name)
    elif o.command == "remove":
        jobs.remove(o.places, o.name)
    else:
        _run_job(o)


def _run_job(o: JobOptions) -> None:
    from virtnbd.cli import backup
    assert o.name is not None
    code = backup.main(list(jobs.load(o.places, o.name).args))
    if code:
        raise JobFailed(job=o.name, code=code, exit_code=code)


class JobFailed(errors.VirtnbdError):
    template = "job {job}: virtnbdbackup exited {code}"

    def __init__(self, **fields: object) -> None:
        super().__init__(**fields)
        self.exit_code = int(str(fields["exit_code"]))


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(PROG, argv, parse, _run)


if __name__ == "__main__":
    sys.exit(main())
