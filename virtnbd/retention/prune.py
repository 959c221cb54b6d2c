"""Apply a retention policy to every chain under a backup root (virtnbdprune).

Decisions, per point (``--dry-run`` prints them, a run logs each removal with them):

* ``keep``   a rule keeps it ("daily 2026-06-08"), or a kept point needs it to
  restore ("needed by virtnbdbackup.9"), or it is the newest full/inc of the
  current chain (the next inc continues from it);
* ``merge``  (with ``merge=True``) a point before the oldest kept full/inc of a
  chain that only kept points need: it goes into a synthetic full at that point
  (:mod:`virtnbd.retention.consolidate`) and is no longer needed;
* ``remove`` no rule keeps it and nothing kept needs it. An archived chain whose
  points are all removed goes as a whole; in a chain that stays, such points
  are leaves (diffs, incs after the newest kept point) and leave the manifest.

Nothing is removed from a chain whose newest point fails verification, and no
archived chain is removed while the newest point of the current chain fails it.
An encrypted chain under the root needs its key: every chain's manifest is
authenticated before anything is removed, and a rewritten one carries a new MAC.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

from virtnbd import errors, fsutil
from virtnbd.backupset import encrypted
from virtnbd.backupset import manifest as bsmanifest
from virtnbd.backupset.api import BackupSet, open_set
from virtnbd.backupset.manifest import Point
from virtnbd.backupset.store import Store
from virtnbd.crypto.keysource import KeySpec
from virtnbd.retention import consolidate, journal, layout, verifylog
from virtnbd.retention.layout import Chain, Root
from virtnbd.retention.policy import Link, Policy, Stamp, decide, needed_by, parse_time
from virtnbd.secrets import RedactFilter

log = logging.getLogger(__name__)

NO_KEY = KeySpec()


@dataclass(frozen=True)
class Decision:
    chain: str
    point: str
    time: str
    level: str
    action: str        # keep | remove | merge
    rule: str

    def as_json(self) -> dict[str, str]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class ChainPlan:
    chain: Chain
    decisions: tuple[Decision, ...]
    remove_all: bool              # an archived chain none of whose points stays
    merge_into: str | None        # consolidation target
    removed: tuple[str, ...]      # points leaving the manifest (not merged)

    @property
    def changes(self) -> bool:
        return self.remove_all or self.merge_into is not None or bool(self.removed)


def _key(chain: Chain, point: Point) -> str:
    return f"{chain.label}/{point.name}"


def plan(root: Root, policy: Policy, merge: bool = False) -> list[ChainPlan]:
    stamps = [Stamp(_key(c, p), parse_time(p.time)) for c in root.chains for p in c.manifest.points]
    rules = decide(stamps, policy)
    return [_chain_plan(c, {p.name: rules[_key(c, p)] for p in c.manifest.points}, merge) for c in root.chains]


def _chain_plan(chain: Chain, rules: dict[str, tuple[str, ...]], merge: bool) -> ChainPlan:
    points = chain.manifest.points
    why = {name: ", ".join(r) for name, r in rules.items() if r}
    heads = [p for p in points if p.level in ("full", "inc")]
    if not chain.archived and heads and heads[-1].name not in why:
        why[heads[-1].name] = "newest of the current chain: the next inc continues from it"
    links = [Link(p.name, p.level, p.parent) for p in points]
    needed = needed_by(links, list(why))
    target = _merge_target(points, why) if merge else None
    merged = _before(points, target)
    decisions, removed = [], []
    for p in points:
        if p.name in merged and p.level in ("full", "inc"):
            action, rule = "merge", f"merged into a synthetic full at {target}"
        elif p.name in why:
            action, rule = "keep", why[p.name]
        elif p.name in needed and p.name not in merged:
            action, rule = "keep", f"needed by {needed[p.name]}"
        else:
            action, rule = "remove", "no rule keeps it and no kept point needs it"
            removed.append(p.name)
        decisions.append(Decision(chain.label, p.name, p.time, p.level, action, rule))
    remove_all = chain.archived and len(removed) == len(points)
    return ChainPlan(chain, tuple(decisions), remove_all, target if merged else None, tuple(removed))


def _merge_target(points: Sequence[Point], kept: dict[str, str]) -> str | None:
    """The oldest full/inc a kept point builds on (itself kept, or the parent of a kept diff)."""
    anchors = {p.name for p in points if p.name in kept and p.level in ("full", "inc")}
    anchors |= {p.parent for p in points if p.name in kept and p.level == "diff" and p.parent}
    return next((p.name for p in points if p.name in anchors), None)


def _before(points: Sequence[Point], target: str | None) -> set[str]:
    if target is None:
        return set()
    names = [p.name for p in points]
    return set(names[:names.index(target)])


# -- execution ---------------------------------------------------------------------

def _verified(chain: Chain, workers: int) -> bool:
    """The newest point verifies: a record younger than ``verifylog.TRUSTED`` or a fresh verify of its chain."""
    newest = chain.manifest.points[-1].name
    recent = verifylog.recent_ok(chain.store, newest)
    if recent is not None:
        log.info("%s: newest point %s verified at %s", chain.folder, newest, recent.time)
        return True
    result = verifylog.verify_point(chain.store, newest, workers)
    if not result.ok:
        log.error("%s: newest point %s failed verification: %s", chain.folder, newest, result.error)
    else:
        log.info("%s: newest point %s verified", chain.folder, newest)
    return result.ok


def _log_removals(cp: ChainPlan) -> None:
    for d in cp.decisions:
        if d.action != "keep":
            log.info("%s %s %s (%s, %s): %s", d.action, cp.chain.folder, d.point, d.level, d.time, d.rule)


def _authentic(chain: Chain) -> BackupSet:
    """The chain's set with its manifest authenticated (an encrypted one needs its key: KeyRequired,
    WrongKey, FormatError when altered) and still the manifest the plan was made from."""
    bset = open_set(chain.folder)
    found = bset.manifest()
    if found is None or bsmanifest.to_json(found) != bsmanifest.to_json(chain.manifest):
        raise errors.BackupSetError(path=str(chain.folder), reason="the manifest changed while planning")
    return bset


def _apply_chain(root: Root, cp: ChainPlan, workers: int) -> None:
    store = cp.chain.store
    bset = _authentic(cp.chain)
    _log_removals(cp)
    if cp.remove_all:
        journal.remove_chain(root.store, cp.chain.label, "no point of the chain is kept by the policy")
        return
    if cp.merge_into is not None:
        consolidate.consolidate(cp.chain.folder, cp.merge_into, cp.removed, workers)
        return
    manifest = cp.chain.manifest
    keep = tuple(p for p in manifest.points if p.name not in cp.removed)
    gone = [p for p in manifest.points if p.name in cp.removed]
    old_files = set().union(*(layout.point_files(p) for p in gone)) - layout.listed_files(
        replace(manifest, points=keep))
    journal.begin(store, old_files, f"prune {', '.join(cp.removed)}")
    bsmanifest.rewrite(store, manifest, keep, encrypted.manifest_key(bset))
    journal.remove_unlisted(store, old_files, "no rule keeps its point")
    journal.finish(store)


def apply(root: Root, plans: Sequence[ChainPlan], workers: int = 4) -> list[str]:
    """Carry out the plans (the caller holds the root's lock and ran journal.recover_root)."""
    refused: list[str] = []
    current = next((c for c in root.chains if not c.archived), None)
    anchor_ok: bool | None = None
    for cp in plans:
        _authentic(cp.chain)           # every chain, changed or not: an altered manifest stops the run
    for cp in plans:
        if not cp.changes:
            continue
        if cp.remove_all:
            if anchor_ok is None:
                anchor_ok = _verified(current, workers) if current is not None else False
            ok = anchor_ok
        else:
            ok = _verified(cp.chain, workers)
        if not ok:
            refused.append(str(cp.chain.folder))
            continue
        _apply_chain(root, cp, workers)
    if refused:
        raise errors.ChainError(reason="nothing removed from " + ", ".join(refused) + ": the newest point "
                                       "failed verification (or there is no current chain to vouch for it)")
    return [str(cp.chain.folder) for cp in plans if cp.changes]


def use_key(key: KeySpec) -> None:
    """Every encrypted chain opened from now on is unlocked with ``key`` (plain chains need none)."""
    encrypted.install()
    encrypted.use_keys(key)


def run(path: str, policy: Policy, *, merge: bool, dry_run: bool, workers: int = 4,
        key: KeySpec = NO_KEY) -> list[ChainPlan]:
    use_key(key)
    root = layout.locate(path)
    if dry_run:
        return plan(root, policy, merge)
    with root.store.lock(), _run_log(root.store):
        journal.recover_root(root.store)
        root = layout.locate(path)
        plans = plan(root, policy, merge)
        apply(root, plans, workers)
    return plans


@contextlib.contextmanager
def _run_log(root: Store) -> Iterator[None]:
    """Every decision and removal also goes to ``prune.<stamp>.log`` in the root (kept with the backups)."""
    with root.open_log(f"prune.{time.strftime('%Y%m%d-%H%M%S')}.log") as raw:
        handler = logging.StreamHandler(fsutil.TextSink(raw))
        handler.setLevel(logging.INFO)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        handler.addFilter(RedactFilter())
        logging.getLogger().addHandler(handler)
        try:
            yield
        finally:
            logging.getLogger().removeHandler(handler)


def _same(a: str, b: str) -> bool:
    return a.rstrip("/") == b.rstrip("/") or (not layout.is_url(a) and os.path.realpath(a) == os.path.realpath(b))


def consolidate_until(path: str, target: str, workers: int = 4, key: KeySpec = NO_KEY) -> consolidate.Result:
    """``--consolidate POINT``: merge a chain up to POINT into a synthetic full (after verifying its newest point)."""
    use_key(key)
    root = layout.locate(path)
    with root.store.lock(), _run_log(root.store):
        journal.recover_root(root.store)
        chains = layout.locate(path).chains
        chain = next((c for c in chains if _same(c.folder, path) or (not c.archived and _same(root.path, path))),
                     None)
        if chain is None:
            raise errors.BackupSetError(path=path, reason="no chain to consolidate here")
        _authentic(chain)
        if not _verified(chain, workers):
            raise errors.ChainError(reason=f"{chain.folder}: not consolidated: the newest point failed verification")
        return consolidate.consolidate(chain.folder, target, (), workers)
