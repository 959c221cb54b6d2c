"""One virtnbdbackup invocation over one or many domains.

One domain runs in this process, into OUTPUT itself. Several (``-d a,b,c``,
``--all``) run each in its own child process (``virtnbd.ops.child``) into
OUTPUT/<domain>/, at most ``--parallel`` at once: a failing or crashing
domain cannot stop the others, and each keeps its own log file. Hooks run
around each domain, metrics and the summary are written at the end, and the
exit code is the worst of all.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import json
import logging
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from virtnbd import errors
from virtnbd.ops import hooks, metrics, stdio
from virtnbd.ops.options import FleetOptions
from virtnbd.secrets import redact_json

if TYPE_CHECKING:
    from virtnbd.backup.options import BackupOptions

log = logging.getLogger(__name__)


class DomainsFailed(errors.VirtnbdError):
    template = "{count} of {total} domains failed: {names}"


@dataclass
class DomainResult:
    domain: str
    status: str = "ok"              # ok | failed | skipped
    exit_code: int = 0
    error: str = ""
    output: str = ""
    log: str = ""
    seconds: float = 0.0
    summary: dict[str, Any] = field(default_factory=dict)

    def fields(self) -> dict[str, object]:
        s = self.summary
        return {"domain": self.domain, "status": self.status, "level": s.get("level", ""),
                "point": s.get("point", ""), "bytes": s.get("bytes_written", 0),
                "bytes_read": s.get("bytes_read", 0), "log": self.log, "output": self.output,
                "error": self.error, "exit_code": self.exit_code}


def run(options: FleetOptions) -> None:
    if options.killonly:
        return _killonly(options)
    domains = resolve_domains(options)
    if not options.many:
        return _single(options, domains[0])
    results = _many(options, domains)
    _finish(options, results)


# -- one domain, in this process -------------------------------------------------

def _single(options: FleetOptions, domain: str) -> None:
    result = DomainResult(domain, output=options.backup.output)
    if hooks.call(options.hook, "start", result.fields()) != 0:
        log.warning("%s skipped: the start hook failed", domain)
        result.status = "skipped"
        _after(options, [result])
        return
    started = time.time()
    try:
        summary = run_one(options.for_domain(domain).backup)
    except errors.VirtnbdError as err:
        result.status, result.error, result.exit_code = "failed", str(err), err.exit_code
        result.log = _run_log(result.output, started)
        result.seconds = time.time() - started
        _after(options, [result])
        raise
    result.summary, result.seconds = summary, time.time() - started
    result.log = _run_log(result.output, started)
    if options.backup.json and options.backup.output != "-":
        _print_json(summary)
    _after(options, [result])


def run_one(backup: Any) -> dict[str, Any]:
    from virtnbd.backup import run as backup_run
    if backup.output != "-":
        return dict(_keep(backup, backup_run.run(backup)).as_json())
    with stdio.scratch_set(backup.scratchdir) as folder:     # -o -: the set streamed as one container
        summary = dict(backup_run.run(dataclasses.replace(backup, output=str(folder))).as_json())
        stdio.write_container(folder)
    return summary


def _keep(backup: Any, summary: Any) -> Any:
    """--keep-*: the retention policy over every chain of the output, only after a committed backup."""
    if backup.keep is not None and summary.point and not summary.skipped:
        from virtnbd.retention import prune as retention
        plans = retention.run(backup.output, backup.keep, merge=backup.merge, dry_run=False, key=backup.key)
        summary.notes.extend(f"{d.action} {d.chain}/{d.point}: {d.rule}" for cp in plans for d in cp.decisions
                             if d.action != "keep")
    return summary


def _after(options: FleetOptions, results: list[DomainResult]) -> None:
    for r in results:
        if r.status != "skipped":
            hooks.call(options.hook, "done", r.fields())
        if r.status == "failed":
            hooks.call(options.hook, "failure", r.fields())
    if options.metrics_file:
        metrics.write(options.metrics_file, [_outcome(r) for r in results if r.status != "skipped"])
    failed = [r.domain for r in results if r.status == "failed"]
    hooks.call(options.hook, "end", {"status": "failed" if failed else "ok", "domains": ",".join(
        r.domain for r in results), "failed": ",".join(failed)})


def _outcome(r: DomainResult) -> metrics.Outcome:
    s = r.summary
    return metrics.Outcome(domain=r.domain, ok=r.status == "ok", finished=time.time(), seconds=round(r.seconds, 3),
                           bytes_written=int(s.get("bytes_written", 0)), bytes_read=int(s.get("bytes_read", 0)),
                           points=len(s.get("points", [])))


def _run_log(folder: str, since: float) -> str:
    """The debug log the run wrote into its folder (``backup.<level>.<time>.log``), if any."""
    try:
        logs = [p for p in Path(folder).glob("backup.*.log") if p.stat().st_mtime >= since - 1]
    except OSError:
        return ""
    return str(max(logs, key=lambda p: p.stat().st_mtime)) if logs else ""


# -- many domains, one child process each -----------------------------------------

class _Children:
    """Child processes alive right now, so an interrupt can pass SIGTERM on."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.procs: set[subprocess.Popen[bytes]] = set()

    def terminate(self) -> None:
        with self.lock:
            for proc in self.procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)


def _many(options: FleetOptions, domains: list[str]) -> list[DomainResult]:
    log.info("backing up %d domains (%s), %d at once", len(domains), ", ".join(domains), options.parallel)
    children = _Children()
    with ThreadPoolExecutor(options.parallel, thread_name_prefix="domain") as pool:
        futures = [pool.submit(_one_child, options, d, children) for d in domains]
        try:
            return [f.result() for f in futures]
        except BaseException:
            children.terminate()
            for f in futures:
                f.cancel()
            raise


def _one_child(options: FleetOptions, domain: str, children: _Children) -> DomainResult:
    one = options.for_domain(domain)
    result = DomainResult(domain, output=one.backup.output)
    if hooks.call(options.hook, "start", result.fields()) != 0:
        log.warning("%s skipped: the start hook failed", domain)
        result.status = "skipped"
        return result
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="virtnbd-child.") as tmp:
        result_file = os.path.join(tmp, "result.json")
        cmd = [sys.executable, "-m", "virtnbd.ops.child", result_file, domain]
        with subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, env=_child_env()) as proc:
            with children.lock:
                children.procs.add(proc)
            assert proc.stdin is not None
            proc.stdin.write(pickle.dumps(one))
            proc.stdin.close()
            code = proc.wait()
            with children.lock:
                children.procs.discard(proc)
        _read_child(result, result_file, code)
    result.seconds = time.time() - started
    result.log = _run_log(result.output, started)
    hooks.call(options.hook, "done", result.fields())
    if result.status == "failed":
        hooks.call(options.hook, "failure", result.fields())
    return result


def _child_env() -> dict[str, str]:
    """Our environment, with this checkout importable (a run straight from a checkout has no install)."""
    root = str(Path(__file__).resolve().parents[2])
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{path}" if path else root}


def _read_child(result: DomainResult, path: str, code: int) -> None:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        data = {}
    result.summary = data.get("summary", {})
    result.exit_code = code if code >= 0 else errors.EXIT_SIGNAL_BASE - code
    if code not in (errors.EXIT_OK, errors.EXIT_WARNINGS):
        result.status = "failed"
        result.error = data.get("error") or f"exited with code {result.exit_code}"
    elif code == errors.EXIT_WARNINGS:
        result.status = "ok"


def _finish(options: FleetOptions, results: list[DomainResult]) -> None:
    for line in summary_table(results):
        log.info("%s", line)
    if options.backup.json:
        _print_json({"domains": [_json_entry(r) for r in results]})
    if options.metrics_file:
        metrics.write(options.metrics_file, [_outcome(r) for r in results if r.status != "skipped"])
    failed = [r for r in results if r.status == "failed"]
    hooks.call(options.hook, "end", {"status": "failed" if failed else "ok",
                                     "domains": ",".join(r.domain for r in results),
                                     "failed": ",".join(r.domain for r in failed)})
    for r in results:
        if r.status == "skipped" or r.exit_code == errors.EXIT_WARNINGS:
            log.warning("%s: %s", r.domain, "skipped" if r.status == "skipped" else "finished with warnings")
    if failed:
        raise DomainsFailed(count=len(failed), total=len(results), names=", ".join(r.domain for r in failed))


def _json_entry(r: DomainResult) -> dict[str, Any]:
    entry = asdict(r)
    entry["seconds"] = round(r.seconds, 3)
    return entry


def summary_table(results: list[DomainResult]) -> list[str]:
    rows = [("DOMAIN", "STATUS", "LEVEL", "POINT", "WRITTEN", "SECONDS", "ERROR")]
    for r in results:
        s = r.summary
        rows.append((r.domain, r.status, str(s.get("level", "")), str(s.get("point") or ""),
                     str(s.get("bytes_written", "")), f"{r.seconds:.1f}", r.error))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return [" ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + " " + row[-1] for row in rows]


def _print_json(obj: Any) -> None:
    json.dump(redact_json(obj), sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")
    sys.stdout.flush()


# -- which domains ------------------------------------------------------------------

def resolve_domains(options: FleetOptions) -> list[str]:
    if not options.all_domains:
        return list(options.domains)
    names = [n for n in _domains_with_disks(options.backup) if _selected(n, options)]
    if not names:
        raise errors.UsageError(reason="--all: no domain with disks to back up matches")
    return names


def _selected(name: str, options: FleetOptions) -> bool:
    if options.match and not any(fnmatch.fnmatchcase(name, p) for p in options.match):
        return False
    return not any(fnmatch.fnmatchcase(name, p) for p in options.exclude_domains)


def _domains_with_disks(backup: BackupOptions) -> list[str]:
    import libvirt

    from virtnbd.remote.session import connected
    from virtnbd.virt import domainxml
    names = []
    with connected(backup.uri, backup.remote) as conn:
        for dom in conn.listAllDomains(0):
            try:
                disks = domainxml.parse_disks(dom.XMLDesc(0))
            except libvirt.libvirtError:
                continue            # gone while we looked
            if disks:
                names.append(dom.name())
    return sorted(names)


def _killonly(options: FleetOptions) -> None:
    from virtnbd.remote.session import connected
    from virtnbd.virt import connection, job
    with connected(options.backup.uri, options.backup.remote) as conn:
        for name in resolve_domains(options):
            dom = connection.lookup_domain(conn, name)
            socket = job.abort_stale(dom)
            log.info("%s: %s", name, f"aborted the backup job of a killed run (socket {socket})" if socket
                     else "no backup job running")
