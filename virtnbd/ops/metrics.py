"""``--metrics-file``: Prometheus text-format metrics for node_exporter's textfile collector.

The file is replaced atomically (temp file, fsync, rename). Samples of
domains not in this run are kept, the last success time of a domain that
failed now is kept from the previous file, and failures are counted across
runs, so one file can serve several jobs.
"""
from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass

from virtnbd import errors

PREFIX = "virtnbd_backup_"
HELP = {
    "last_success_timestamp_seconds": "Unix time of the last successful backup",
    "last_run_timestamp_seconds": "Unix time of the last backup run",
    "success": "1 when the last run of the domain succeeded (or was skipped), 0 when it failed",
    "duration_seconds": "Seconds the last run of the domain took",
    "bytes_written": "Bytes stored by the last successful run",
    "bytes_read": "Bytes read from the disks by the last successful run",
    "points": "Points in the domain's backup chain after the last successful run",
    "failures_total": "Failed runs of the domain counted by this file",
}
_SAMPLE = re.compile(r'^virtnbd_backup_(\w+)\{domain="((?:[^"\\]|\\.)*)"\} (\S+)$')


@dataclass(frozen=True)
class Outcome:
    domain: str
    ok: bool
    finished: float            # unix time
    seconds: float
    bytes_written: int = 0
    bytes_read: int = 0
    points: int = 0


def read(path: str) -> dict[tuple[str, str], float]:
    """(metric, domain) -> value of a file this module wrote (missing file: empty)."""
    samples: dict[tuple[str, str], float] = {}
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                m = _SAMPLE.match(line.strip())
                if m and m.group(1) in HELP:
                    samples[(m.group(1), m.group(2))] = float(m.group(3))
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as err:
        raise errors.StorageError(path=path, reason=f"unreadable metrics file: {err}") from err
    return samples


def update(samples: dict[tuple[str, str], float], outcomes: Iterable[Outcome]) -> dict[tuple[str, str], float]:
    new = dict(samples)
    for o in outcomes:
        d = _escape(o.domain)
        new[("last_run_timestamp_seconds", d)] = o.finished
        new[("success", d)] = 1.0 if o.ok else 0.0
        new[("duration_seconds", d)] = o.seconds
        new.setdefault(("failures_total", d), 0.0)
        if o.ok:
            new[("last_success_timestamp_seconds", d)] = o.finished
            new[("bytes_written", d)] = float(o.bytes_written)
            new[("bytes_read", d)] = float(o.bytes_read)
            new[("points", d)] = float(o.points)
        else:
            new[("failures_total", d)] += 1
    return new


def render(samples: dict[tuple[str, str], float]) -> str:
    lines = []
    for metric, text in HELP.items():
        rows = sorted((d, v) for (m, d), v in samples.items() if m == metric)
        if not rows:
            continue
        kind = "counter" if metric.endswith("_total") else "gauge"
        lines += [f"# HELP {PREFIX}{metric} {text}", f"# TYPE {PREFIX}{metric} {kind}"]
        lines += [f'{PREFIX}{metric}{{domain="{d}"}} {_number(v)}' for d, v in rows]
    return "\n".join(lines) + "\n"


def write(path: str, outcomes: Iterable[Outcome]) -> None:
    """Merge ``outcomes`` into the file at ``path`` atomically (0644: node_exporter must read it)."""
    text = render(update(read(path), outcomes))
    folder = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=".virtnbd-metrics.", dir=folder)
    except OSError as err:
        raise errors.StorageError(path=path, reason=err.strerror or str(err)) from err
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as err:
        os.unlink(tmp)
        raise errors.StorageError(path=path, reason=err.strerror or str(err)) from err


def _escape(name: str) -> str:
    return name.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    return str(int(value)) if value == int(value) else repr(value)
