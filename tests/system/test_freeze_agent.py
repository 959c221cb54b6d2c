"""virtnbd.virt.agent.quiesced against a real booted guest and a real libvirt backup job.

What the command-line tests cannot aim at precisely: a signal that arrives
while the guest IS frozen, a guest left frozen by somebody else, and the
guest facts and timings the context manager reports.
"""
from __future__ import annotations

import logging
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.lab.guest_lab import DATA_MOUNT, GUEST_HOSTNAME, Guest

pytestmark = [pytest.mark.system, pytest.mark.guest]


@pytest.fixture
def guest(module_guest: Guest) -> Guest:
    """The booted guest this module shares (tests/lab/guest_lab.py)."""
    return module_guest




def _backup_xml(g: Guest, tag: str) -> str:
    from virtnbd.virt import xmlbuild

    return xmlbuild.backup_xml(str(g.dir / "sock" / f"{tag}.sock"),
                               [xmlbuild.BackupDisk("vda", str(g.dir / f"scratch-{tag}.qcow2"))])


@pytest.fixture
def shell_signals() -> Iterator[None]:
    """The command shell's SIGINT/SIGTERM handlers (raise errors.Interrupted), restored afterwards."""
    from virtnbd.cli import shell

    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    shell.install_signal_handlers()
    try:
        yield
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


def test_quiesced_reports_facts_and_freeze_time(guest: Guest) -> None:
    from virtnbd.virt import agent, job

    with job.BackupJob(guest.dom) as j:
        with agent.quiesced(guest.dom, agent.QuiesceOptions()) as q:
            assert guest.fsfreeze_status() == "frozen"
            j.begin(_backup_xml(guest, "facts"))
        assert guest.fsfreeze_status() == "thawed"
    assert q.consistency == "filesystem"
    assert q.frozen_filesystems == 1
    assert 0 < q.frozen_seconds < 30
    assert q.guest_info["hostname"] == GUEST_HOSTNAME
    assert q.guest_info["os"]["kernel-release"].endswith("cloud-amd64")
    assert q.guest_info["filesystems"][0]["mountpoint"] == DATA_MOUNT
    assert q.record()["consistency"] == "filesystem"


def test_signal_inside_freeze_window_is_held_until_thawed(guest: Guest, shell_signals: None) -> None:
    from virtnbd import errors
    from virtnbd.virt import agent, job

    seen_frozen, began = None, False
    with job.BackupJob(guest.dom) as j, pytest.raises(errors.Interrupted) as caught:
        with agent.quiesced(guest.dom, agent.QuiesceOptions()) as q:
            seen_frozen = guest.fsfreeze_status()
            # raise_signal runs the Python handler before it returns (PyErr_CheckSignals): no sleep
            # decides whether the handler ran; it must hold the signal, not raise
            signal.raise_signal(signal.SIGTERM)
            j.begin(_backup_xml(guest, "sig"))
            began = True
        pytest.fail("Interrupted must be raised when the quiesced block is left")
    assert seen_frozen == "frozen"
    assert began, "the signal was not held: it interrupted the freeze window"
    assert caught.value.signum == signal.SIGTERM
    assert q.consistency == "filesystem"
    assert guest.fsfreeze_status() == "thawed"
    assert not j.started                # BackupJob.__exit__ aborted the job after the interrupt


def test_thawed_when_job_start_fails(guest: Guest) -> None:
    from virtnbd import errors
    from virtnbd.virt import agent, job

    bad = _backup_xml(guest, "bad").replace(str(guest.dir / "sock"), "/nonexistent-dir-vnbd")
    with job.BackupJob(guest.dom) as j, pytest.raises(errors.LibvirtError):
        with agent.quiesced(guest.dom, agent.QuiesceOptions()) as q:
            j.begin(bad)
    assert q.consistency == "filesystem" and q.frozen_seconds > 0
    assert guest.fsfreeze_status() == "thawed"


def test_guest_left_frozen_is_thawed_and_frozen_again(guest: Guest, caplog: pytest.LogCaptureFixture) -> None:
    from virtnbd.virt import agent, job

    assert guest.dom.fsFreeze(None, 0) == 1      # e.g. a killed earlier run
    caplog.set_level(logging.INFO, logger="virtnbd.virt.agent")
    with job.BackupJob(guest.dom) as j:
        with agent.quiesced(guest.dom, agent.QuiesceOptions()) as q:
            j.begin(_backup_xml(guest, "stale"))
    assert "was left with 1 frozen filesystem(s)" in caplog.text
    assert q.consistency == "filesystem" and q.guest_info["hostname"] == GUEST_HOSTNAME
    assert guest.fsfreeze_status() == "thawed"


def test_no_freeze_still_keeps_guest_facts(guest: Guest, tmp_path: Path) -> None:
    from virtnbd.virt import agent

    with agent.quiesced(guest.dom, agent.QuiesceOptions(freeze=False)) as q:
        assert guest.fsfreeze_status() == "thawed"
    assert q.consistency == "crash"
    assert q.guest_info["hostname"] == GUEST_HOSTNAME
