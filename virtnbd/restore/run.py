"""The restore command's engine: select the chain, then restore, dump or verify."""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from virtnbd import errors
from virtnbd.restore import dump, encrypted, verify
from virtnbd.restore import plan as plan_mod
from virtnbd.restore.apply import Engine, Stopped, apply_windows
from virtnbd.restore.options import RestoreOptions
from virtnbd.restore.plan import Layer, Plan, collapse, windows
from virtnbd.restore.source import (
    DiskChain,
    Selection,
    check_against_entry,
    check_links,
    describe,
    opened,
    select,
    select_sequence,
)
from virtnbd.restore.targets import TargetRequest, open_target, scheme_of
from virtnbd.restore.targets.rbd import explicit_targets

if TYPE_CHECKING:
    from virtnbd.restore.targets.remote import RemoteHost

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RestoredDisk:
    disk: str
    point: str
    target: str                # final path / spec
    format: str
    virtual_size: int
    data_bytes: int            # bytes the plan holds as data
    bytes_written: int         # bytes the target counted
    chain_length: int
    seconds: float


def run(options: RestoreOptions) -> None:
    _is_encrypted, keyless = encrypted.prepare(options)
    selection = make_selection(options)
    if options.action == "dump":
        dump.show(selection, as_json=options.json, out=sys.stdout)
    elif options.action == "verify":
        verify.run(selection, workers=options.worker)
        if keyless:
            log.warning("%s", encrypted.UNAUTHENTICATED)
    elif options.action in ("instant", "drill"):
        from virtnbd.restore import drill, instant
        (instant if options.action == "instant" else drill).run(selection, options)
    else:
        restore(selection, options)


def make_selection(options: RestoreOptions) -> Selection:
    if options.sequence:
        return select_sequence(options.sequence, options.disk)
    if options.action in ("restore", "instant", "drill"):
        return select(options.input, options.until, options.disk)
    return verify.select_all(options.input, options.until, options.disk)


def target_spec(output: str, disk: str, fmt: str, host: RemoteHost | None = None) -> str:
    """Where one disk goes: ``OUT/<disk>.<fmt>`` (``remote:OUT/...`` on another host), or
    ``<scheme>:.../<disk>`` for store targets."""
    if scheme_of(output) is not None:
        return f"{output.rstrip('/')}/{disk}"
    if host is not None:
        return host.target_spec(output, disk, fmt)
    return os.path.join(output, f"{disk}.{fmt}")


def restore(selection: Selection, options: RestoreOptions) -> list[RestoredDisk]:
    if not options.output and not options.targets:
        raise errors.UsageError(reason="restore needs an output folder (-o DIR)")
    with _host(options) as host:
        specs = explicit_targets(options.targets, [c.disk for c in selection.disks])
        if options.output and scheme_of(options.output) is None:
            _make_folder(options.output, host)
        jobs = [(chain, specs.get(chain.disk) or target_spec(_need_output(options.output, chain.disk), chain.disk,
                                                             options.format, host)) for chain in selection.disks]
        done = restore_disks(jobs, options, {"remote_host": host} if host else {})
        if options.adjust_config or options.define:
            from virtnbd.restore import config  # -c/-D: domain XML (lxml), only when asked
            config.write_for_restore(selection, done, options, host)
        return done


@contextlib.contextmanager
def _host(options: RestoreOptions) -> Iterator[RemoteHost | None]:
    """The remote host of ``-U qemu+ssh://HOST`` (one ssh connection for the run), else None."""
    if options.remote is None:
        yield None
        return
    from virtnbd.restore.targets import remote  # ssh, remote qemu-nbd: only for another host
    with remote.open_host(options.remote, options.password_file) as host:
        yield host


def _make_folder(folder: str, host: RemoteHost | None) -> None:
    if host is not None:
        host.make_folder(folder)
        return
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as err:
        raise errors.StorageError(path=folder, reason=err.strerror or str(err)) from err


def restore_disks(jobs: Sequence[tuple[DiskChain, str]], options: RestoreOptions,
                  extra: Mapping[str, Any] | None = None) -> list[RestoredDisk]:
    """Restore the disks in parallel (up to ``-w`` at once) on one shared engine and memory budget.

    The first failure stops the other disks between batches; a stopped or failed disk's
    target is aborted (its partial file removed), so the only images left under their final
    names are disks that completed. The first real error (not a "stopped") is raised.
    """
    parallel = max(1, min(options.worker, len(jobs)))
    budget = plan_mod.ENTRY_BUDGET // parallel
    with Engine(options.worker) as engine, ThreadPoolExecutor(parallel, thread_name_prefix="disk") as disks:
        try:
            futures = [disks.submit(_guarded, engine, chain, options, spec, budget, extra=extra or {})
                       for chain, spec in jobs]
            wait(futures, return_when=FIRST_EXCEPTION)
            if any(f.done() and f.exception() is not None for f in futures):
                engine.stop.set()
            wait(futures)
        except BaseException:
            engine.stop.set()            # a signal in this thread: every disk stops and aborts its target
            raise
    failures = [f.exception() for f in futures if f.exception() is not None]
    real = [e for e in failures if not isinstance(e, Stopped)]
    if real or failures:
        raise (real or failures)[0]  # type: ignore[misc]
    return [f.result() for f in futures]


def _guarded(engine: Engine, chain: DiskChain, options: RestoreOptions, spec: str, budget: int, *,
             extra: Mapping[str, Any]) -> RestoredDisk:
    try:
        return restore_disk(chain, options, spec, engine, budget, extra=extra)
    except BaseException:
        engine.stop.set()
        raise


def _need_output(output: str | None, disk: str) -> str:
    if not output:
        raise errors.UsageError(reason=f"disk {disk}: no --target {disk}=... and no -o OUT for it")
    return output


def open_layers(chain: DiskChain, stack: contextlib.ExitStack) -> tuple[list[Layer], list]:
    """Open every file of the chain and check it (nothing read beyond headers, nothing written)."""
    readers = [stack.enter_context(opened(cf)) for cf in chain.files]
    for cf, reader in zip(chain.files, readers, strict=True):
        check_against_entry(cf, reader)
    check_links(chain.files, [r.meta for r in readers])
    layers = []
    for cf, reader in zip(chain.files, readers, strict=True):
        batches = getattr(reader, "index_batches", None)
        if batches is not None:
            layers.append(Layer(cf.path, cf.point, reader.meta.virtual_size, batches=batches))
        else:
            layers.append(Layer(cf.path, cf.point, reader.meta.virtual_size, frames=_frames(reader, chain)))
    return layers, readers


def _frames(reader: Any, chain: DiskChain) -> Any:
    try:
        return reader.frames()
    except errors.FormatError as err:
        raise describe(err, chain.files) from err


def build_plan(chain: DiskChain, stack: contextlib.ExitStack) -> tuple[Plan, list]:
    """The whole extent map in memory (small chains, tools); restores use windows."""
    layers, readers = open_layers(chain, stack)
    try:
        return collapse(layers, disk=chain.disk), readers
    except errors.FormatError as err:
        raise describe(err, chain.files) from err


def restore_disk(chain: DiskChain, options: RestoreOptions, spec: str, engine: Engine | None = None,
                 entry_budget: int = plan_mod.ENTRY_BUDGET, *, extra: Mapping[str, Any] | None = None
                 ) -> RestoredDisk:
    if engine is None:
        with Engine(options.worker) as own:
            return restore_disk(chain, options, spec, own, entry_budget, extra=extra)
    started = time.monotonic()
    point = chain.files[-1].point
    with contextlib.ExitStack() as stack:
        layers, readers = open_layers(chain, stack)
        size = layers[-1].virtual_size
        log.info("%s: restoring point %s (%d file(s)) to %s", chain.disk, point, len(chain.files), spec)
        request = TargetRequest(spec=spec, format=options.format, virtual_size=size,
                                preallocate=options.preallocate, workers=options.worker,
                                image_info=chain.image_info,
                                extra={"rbd": options.rbd, "point": point, **(extra or {})})
        with open_target(request) as target, _progress(options, size, chain.disk) as tick:
            try:
                result = apply_windows(windows(layers, entry_budget=entry_budget), readers, target, engine, tick)
            except errors.FormatError as err:
                raise describe(err, chain.files) from err
            target.commit()
    seconds = time.monotonic() - started
    log.info("%s: wrote %s in %.1f s -> %s", chain.disk, _size(target.bytes_written), seconds, spec)
    return RestoredDisk(disk=chain.disk, point=point, target=spec, format=options.format,
                        virtual_size=size, data_bytes=result.data_bytes,
                        bytes_written=target.bytes_written, chain_length=len(chain.files), seconds=seconds)


@contextlib.contextmanager
def _progress(options: RestoreOptions, total: int, disk: str) -> Iterator[Callable[[int], None] | None]:
    if options.noprogress or not sys.stderr.isatty():
        yield None
        return
    from tqdm import tqdm
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=disk, leave=False) as bar:
        def tick(n: int) -> None:
            bar.update(n)
        yield tick


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{n} B"
        value /= 1024
    return f"{n} B"
