"""The restore command's engine: select the chain, then restore, dump or verify."""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from virtnbd import errors
from virtnbd.restore import config, dump, encrypted, verify
from virtnbd.restore.apply import apply_plan
from virtnbd.restore.options import RestoreOptions
from virtnbd.restore.plan import Layer, Plan, collapse
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
    else:
        restore(selection, options)


def make_selection(options: RestoreOptions) -> Selection:
    if options.sequence:
        return select_sequence(options.sequence, options.disk)
    if options.action == "restore":
        return select(options.input, options.until, options.disk)
    return verify.select_all(options.input, options.until, options.disk)


def target_spec(output: str, disk: str, fmt: str) -> str:
    """Where one disk goes: ``OUT/<disk>.<fmt>``, or ``<scheme>:.../<disk>`` for store targets."""
    if scheme_of(output) is not None:
        return f"{output.rstrip('/')}/{disk}"
    return os.path.join(output, f"{disk}.{fmt}")


def restore(selection: Selection, options: RestoreOptions) -> list[RestoredDisk]:
    if not options.output and not options.targets:
        raise errors.UsageError(reason="restore needs an output folder (-o DIR)")
    specs = explicit_targets(options.targets, [c.disk for c in selection.disks])
    if options.output and scheme_of(options.output) is None:
        try:
            os.makedirs(options.output, exist_ok=True)
        except OSError as err:
            raise errors.StorageError(path=options.output, reason=err.strerror or str(err)) from err
    done: list[RestoredDisk] = []
    for chain in selection.disks:
        spec = specs.get(chain.disk) or target_spec(_need_output(options.output, chain.disk), chain.disk,
                                                    options.format)
        done.append(restore_disk(chain, options, spec))
    if options.adjust_config or options.define:
        config.write_for_restore(selection, done, options)
    return done


def _need_output(output: str | None, disk: str) -> str:
    if not output:
        raise errors.UsageError(reason=f"disk {disk}: no --target {disk}=... and no -o OUT for it")
    return output


def build_plan(chain: DiskChain, stack: contextlib.ExitStack) -> tuple[Plan, list]:
    """Open every file of the chain, check it, and collapse it (nothing written yet)."""
    readers = [stack.enter_context(opened(cf)) for cf in chain.files]
    for cf, reader in zip(chain.files, readers, strict=True):
        check_against_entry(cf, reader)
    check_links(chain.files, [r.meta for r in readers])
    layers = []
    for cf, reader in zip(chain.files, readers, strict=True):
        try:
            frames = reader.frames()
        except errors.FormatError as err:
            raise describe(err, chain.files) from err
        layers.append(Layer(cf.path, cf.point, reader.meta.virtual_size, frames))
    return collapse(layers, disk=chain.disk), readers


def restore_disk(chain: DiskChain, options: RestoreOptions, spec: str) -> RestoredDisk:
    started = time.monotonic()
    point = chain.files[-1].point
    with contextlib.ExitStack() as stack:
        plan, readers = build_plan(chain, stack)
        log.info("%s: restoring point %s (%d file(s), %s data) to %s", chain.disk, point, len(chain.files),
                 _size(plan.data_bytes), spec)
        request = TargetRequest(spec=spec, format=options.format, virtual_size=plan.virtual_size,
                                preallocate=options.preallocate, workers=options.worker,
                                image_info=chain.image_info, extra={"rbd": options.rbd, "point": point})
        with open_target(request) as target, _progress(options, plan.virtual_size, chain.disk) as tick:
            try:
                apply_plan(plan, readers, target, workers=options.worker, progress=tick)
            except errors.FormatError as err:
                raise describe(err, chain.files) from err
            target.commit()
    seconds = time.monotonic() - started
    log.info("%s: wrote %s in %.1f s -> %s", chain.disk, _size(target.bytes_written), seconds, spec)
    return RestoredDisk(disk=chain.disk, point=point, target=spec, format=options.format,
                        virtual_size=plan.virtual_size, data_bytes=plan.data_bytes,
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
