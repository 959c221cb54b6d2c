"""``-a dump``: the metadata of every point, as a table for people or JSON for scripts."""
from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, TextIO

from virtnbd import errors
from virtnbd.restore import drilllog
from virtnbd.restore.source import Selection, opened
from virtnbd.secrets import redact_json


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _entry(entry: Any) -> dict[str, Any]:
    keys = ("disk", "file", "disk_format", "virtual_size", "level", "stored_bytes", "data_bytes", "zero_bytes",
            "digest", "file_digest", "extra")
    return {k: _plain(getattr(entry, k, None)) for k in keys}


def _point(point: Any, with_xml: bool) -> dict[str, Any]:
    out = {k: _plain(getattr(point, k, None)) for k in ("name", "level", "parent", "checkpoint", "time", "consistency")}
    out["disks"] = {name: _entry(e) for name, e in sorted(point.disks.items())}
    out["extra"] = _plain(getattr(point, "extra", {}))
    if with_xml:
        out["domain_xml"] = getattr(point, "domain_xml", None)
        out["checkpoint_xml"] = getattr(point, "checkpoint_xml", None)
    return out


def as_dict(selection: Selection, with_xml: bool = False) -> dict[str, Any]:
    if selection.manifest is None:
        return {"folder": selection.folder, "sequence": [_stream(cf.path, cf.point) for chain in selection.disks
                                                         for cf in chain.files]}
    m = selection.manifest
    kind = selection.bset.kind if selection.bset is not None else "stream"
    return {"folder": selection.folder, "kind": kind, "domain": m.domain, "domain_uuid": m.domain_uuid,
            "points": [_point(p, with_xml) for p in selection.points]}


def _stream(path: str, point: str) -> dict[str, Any]:
    from virtnbd.restore.source import ChainFile
    with opened(ChainFile(path, point, "?")) as reader:
        meta = reader.meta
    keys = ("disk", "disk_format", "virtual_size", "level", "checkpoint", "parent", "time", "compression",
            "tool_version", "extra")
    return {"file": path, **{k: _plain(getattr(meta, k)) for k in keys}}


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "K", "M", "G", "T"):
        if value < 1024 or unit == "T":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return str(n)


def table(data: Mapping[str, Any]) -> str:
    if "sequence" in data:
        rows: list[tuple[Any, ...]] = [("FILE", "DISK", "LEVEL", "CHECKPOINT", "PARENT", "SIZE", "TIME")]
        rows += [(s["file"], s["disk"], s["level"], s["checkpoint"] or "-", s["parent"] or "-",
                  _size(s["virtual_size"]), s["time"]) for s in data["sequence"]]
        return _format(rows)
    kind = data.get("kind", "stream")
    head = f"domain {data['domain']} ({data['domain_uuid']}), {kind} set, folder {data['folder']}\n"
    rows = [("POINT", "LEVEL", "PARENT", "TIME", "CONSISTENCY", "DISK", "SIZE", "DATA", "STORED", "FILE")]
    for p in data["points"]:
        disks = list(p["disks"].values()) or [None]
        for i, d in enumerate(disks):
            first = i == 0
            rows.append((p["name"] if first else "", p["level"] if first else "", (p["parent"] or "-") if first else "",
                         p["time"] if first else "", p["consistency"] if first else "",
                         d["disk"] if d else "-", _size(d["virtual_size"]) if d else "-",
                         _size(d["data_bytes"]) if d else "-", _size(d["stored_bytes"]) if d else "-",
                         d["file"] if d else "-"))
    drills = [f"last drill of {p['name']}: {drilllog.last_text(p)}\n" for p in data["points"]
              if drilllog.last(p) is not None]
    return head + _format(rows) + "".join(drills)


def _format(rows: list[tuple[Any, ...]]) -> str:  # rows of any width
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells) + "\n"


def show(selection: Selection, as_json: bool, out: TextIO) -> None:
    try:
        data = as_dict(selection, with_xml=as_json)
    except OSError as err:
        raise errors.BackupSetError(path=selection.folder, reason=err.strerror or str(err)) from err
    if as_json:
        json.dump(redact_json(data), out, indent=2, sort_keys=False)
        out.write("\n")
    else:
        out.write(table(data))
