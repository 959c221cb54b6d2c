"""``virtnbdprune --status``: every chain and point under a root, sizes, consistency, last verify, last drill."""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from virtnbd.restore import drilllog
from virtnbd.retention import layout, verifylog
from virtnbd.retention.prune import Decision


@dataclass(frozen=True)
class Row:
    chain: str
    point: str
    time: str
    level: str
    stored_bytes: int
    data_bytes: int
    consistency: str
    verify: str         # "ok <time>" | "FAILED <time>: <error>" | "never"
    drill: str = "never"    # "pass <time>: <reason> (agent .. s, total .. s)" | "fail ..." | "never"


def _verify_text(result: verifylog.Result | None) -> str:
    if result is None:
        return "never"
    return f"ok {result.time}" if result.ok else f"FAILED {result.time}: {result.error}"


def rows(path: str) -> list[Row]:
    found = []
    for chain in layout.locate(path).chains:
        verified = verifylog.load(chain.store)
        for p in chain.manifest.points:
            found.append(Row(chain.label, p.name, p.time, p.level,
                             sum(d.stored_bytes for d in p.disks.values()),
                             sum(d.data_bytes for d in p.disks.values()), p.consistency,
                             _verify_text(verified.get(p.name)), drilllog.last_text(p)))
    return found


def as_json(found: Sequence[Row]) -> dict[str, Any]:
    chains: dict[str, dict[str, Any]] = {}
    for r in found:
        c = chains.setdefault(r.chain, {"chain": r.chain, "points": [], "stored_bytes": 0, "data_bytes": 0})
        c["points"].append(r.__dict__)
        c["stored_bytes"] += r.stored_bytes
        c["data_bytes"] += r.data_bytes
    return {"chains": list(chains.values()), "points": len(found),
            "stored_bytes": sum(r.stored_bytes for r in found), "data_bytes": sum(r.data_bytes for r in found)}


def show(found: Sequence[Row], out: TextIO, json_out: bool = False) -> None:
    if json_out:
        json.dump(as_json(found), out, indent=1, sort_keys=True)
        out.write("\n")
        return
    out.write(f"{'chain':<24} {'point':<22} {'time':<25} {'level':<5} {'stored':>12} {'data':>12} "
              f"{'consistency':<11} verify\n")
    for r in found:
        out.write(f"{r.chain:<24} {r.point:<22} {r.time:<25} {r.level:<5} {r.stored_bytes:>12} "
                  f"{r.data_bytes:>12} {r.consistency:<11} {r.verify}\n")
        if r.drill != "never":
            out.write(f"{'':<24} {r.point:<22} last drill: {r.drill}\n")
    doc = as_json(found)
    for c in doc["chains"]:
        out.write(f"total {c['chain']}: {len(c['points'])} point(s), {c['stored_bytes']} bytes stored, "
                  f"{c['data_bytes']} bytes of data\n")
    out.write(f"total: {doc['points']} point(s), {doc['stored_bytes']} bytes stored, {doc['data_bytes']} bytes "
              "of data\n")


def show_decisions(decisions: Sequence[Decision], out: TextIO, json_out: bool = False) -> None:
    if json_out:
        json.dump({"points": [d.as_json() for d in decisions]}, out, indent=1, sort_keys=True)
        out.write("\n")
        return
    for d in decisions:
        out.write(f"{d.action:<6} {d.chain:<24} {d.point:<22} {d.time:<25} {d.level:<5} {d.rule}\n")
