"""Decision logic of virtnbd.virt.agent with a scripted fake domain (the real guest: tests/system/test_freeze*.py)."""
from __future__ import annotations

import json
import logging
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

libvirt = pytest.importorskip("libvirt")

from virtnbd import errors  # noqa: E402
from virtnbd.virt import agent  # noqa: E402

CHANNEL = ("<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'{state}/></channel>")


def lv_error(msg: str, code: int = libvirt.VIR_ERR_INTERNAL_ERROR) -> Any:
    err = libvirt.libvirtError(msg)
    err.err = (code, 0, msg, 2, None, None, None, 0, 0)
    return err


class FakeDom:
    """Just enough of virDomain; every call is recorded in ``calls``."""

    def __init__(self, *, channel: str | None = "connected", state: int = libvirt.VIR_DOMAIN_RUNNING,
                 freeze: int | Exception = 1, thaw_failures: int = 0, info: Exception | None = None,
                 info_delay: float = 0.0, stale_frozen: int = 0, ping: Exception | None = None) -> None:
        self.channel = channel
        self._state = state
        self.freeze = freeze
        self.thaw_failures = thaw_failures
        self.info = info
        self.info_delay = info_delay
        self.stale_frozen = stale_frozen
        self.ping = ping
        self.calls: list[str] = []

    def name(self) -> str:
        return "fake"

    def state(self) -> tuple[int, int]:
        return self._state, 0

    def XMLDesc(self, _flags: int = 0) -> str:
        state = f" state='{self.channel}'" if self.channel else ""
        channel = "" if self.channel is None else CHANNEL.format(state=state)
        return f"<domain><name>fake</name><devices>{channel}</devices></domain>"

    def agent_command(self, command: str, timeout: int) -> str:
        self.calls.append(f"agent {json.loads(command)['execute']} {timeout}")
        if self.ping is not None:
            raise self.ping
        return '{"return": {}}'

    def guestInfo(self, types: int, _flags: int) -> dict[str, Any]:
        self.calls.append("guestInfo")
        time.sleep(self.info_delay)
        if self.stale_frozen:
            raise lv_error("Command guest-get-osinfo has been disabled: the agent is in frozen state")
        if self.info is not None:
            raise self.info
        if types == libvirt.VIR_DOMAIN_GUEST_INFO_FILESYSTEM:
            return {"fs.count": 1, "fs.0.mountpoint": "/", "fs.0.fstype": "ext4", "fs.0.disk.count": 1,
                    "fs.0.disk.0.alias": "vda", "fs.0.name": "vda1"}
        return {"hostname": "g1", "os.id": "debian", "timezone.name": "UTC"}

    def fsFreeze(self, mountpoints: list[str] | None, _flags: int) -> int:
        self.calls.append(f"freeze {mountpoints}")
        if isinstance(self.freeze, Exception):
            raise self.freeze
        return self.freeze

    def fsThaw(self, _mountpoints: Any, _flags: int) -> int:
        self.calls.append("thaw")
        if self.stale_frozen:
            n, self.stale_frozen = self.stale_frozen, 0
            return n
        if self.thaw_failures:
            self.thaw_failures -= 1
            raise lv_error("agent went away")
        return 1

    def suspend(self) -> None:
        self.calls.append("suspend")

    def resume(self) -> None:
        self.calls.append("resume")


@pytest.fixture(autouse=True)
def fake_agent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(agent, "THAW_RETRY_DELAY", 0.0)
    monkeypatch.setattr(agent, "_agent_command", lambda dom, command, timeout: dom.agent_command(command, timeout))


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    caplog.set_level(logging.DEBUG, logger="virtnbd.virt.agent")
    yield caplog


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def run(dom: FakeDom, **options: Any) -> agent.Quiesced:
    with agent.quiesced(dom, agent.QuiesceOptions(**options)) as q:  # type: ignore[arg-type]
        dom.calls.append("begin")
    return q


# --------------------------------------------------------------------------


def test_options_are_checked() -> None:
    with pytest.raises(errors.UsageError, match="positive"):
        agent.QuiesceOptions(timeout=0)
    with pytest.raises(errors.UsageError, match="absolute"):
        agent.QuiesceOptions(mountpoints=("/", "var"))


def test_freeze_begin_thaw_in_that_order(logs: pytest.LogCaptureFixture) -> None:
    dom = FakeDom()
    q = run(dom)
    assert dom.calls == ["agent guest-ping 10", "guestInfo", "guestInfo", "freeze None", "begin", "thaw"]
    assert q.consistency == "filesystem" and q.frozen_filesystems == 1 and q.frozen_seconds > 0
    assert q.guest_info == {"hostname": "g1", "os": {"id": "debian"}, "timezone": {"name": "UTC"},
                            "filesystems": [{"mountpoint": "/", "fstype": "ext4", "name": "vda1", "disks": ["vda"]}]}
    assert not warnings_of(logs)
    assert "frozen for" in logs.text
    assert q.record()["frozen_filesystems"] == 1


def test_mountpoints_are_passed_and_counted(logs: pytest.LogCaptureFixture) -> None:
    dom = FakeDom(freeze=1)
    q = run(dom, mountpoints=("/", "/var"))
    assert "freeze ['/', '/var']" in dom.calls and dom.calls[-1] == "thaw"
    assert q.consistency == "crash"
    assert "froze 1 filesystem(s) of 2 requested" in warnings_of(logs)[0]


def test_nothing_frozen_is_crash_consistent(logs: pytest.LogCaptureFixture) -> None:
    q = run(FakeDom(freeze=0))
    assert q.consistency == "crash" and "froze 0 filesystem(s)" in warnings_of(logs)[0]


@pytest.mark.parametrize(("channel", "message"), [(None, "has no guest agent channel"),
                                                   ("disconnected", "is not connected")])
def test_no_usable_channel_warns(channel: str | None, message: str, logs: pytest.LogCaptureFixture) -> None:
    dom = FakeDom(channel=channel)
    q = run(dom)
    assert dom.calls == ["begin"]
    assert q.consistency == "crash" and q.guest_info == {}
    (warning,) = warnings_of(logs)
    assert message in warning and "crash-consistent" in warning


def test_hung_agent_times_out(logs: pytest.LogCaptureFixture) -> None:
    # the agent would answer after 6 s; the 1 s timeout must give up long before. The bound is
    # generous (a loaded 2-core machine may stall a while) yet far below the answer's delay.
    dom = FakeDom(info_delay=6.0)
    t0 = time.monotonic()
    q = run(dom, timeout=1)
    assert time.monotonic() - t0 < 5
    assert q.consistency == "crash" and "begin" in dom.calls and "thaw" not in dom.calls
    assert "no answer to guest-info within 1s" in warnings_of(logs)[0]


def test_unresponsive_agent_gets_no_thaw_probe(logs: pytest.LogCaptureFixture) -> None:
    dom = FakeDom(info=lv_error("Guest agent is not responding", libvirt.VIR_ERR_AGENT_UNRESPONSIVE))
    q = run(dom)
    assert q.consistency == "crash" and dom.calls == ["agent guest-ping 10", "guestInfo", "begin"]


def test_ping_timeout_is_passed_to_libvirt(logs: pytest.LogCaptureFixture) -> None:
    dom = FakeDom(ping=lv_error("Guest agent not available for now", libvirt.VIR_ERR_AGENT_UNRESPONSIVE))
    q = run(dom, timeout=3)
    assert dom.calls == ["agent guest-ping 3", "begin"]
    assert q.consistency == "crash"
    assert "no answer to guest-ping within 3s" in warnings_of(logs)[0]


def test_guest_left_frozen_is_thawed_first(logs: pytest.LogCaptureFixture) -> None:
    dom = FakeDom(stale_frozen=2)
    q = run(dom)
    assert dom.calls[:3] == ["agent guest-ping 10", "guestInfo", "thaw"]
    assert q.consistency == "filesystem"
    assert "was left with 2 frozen filesystem(s)" in warnings_of(logs)[0]


def test_failed_freeze_still_thaws_once_and_goes_on(logs: pytest.LogCaptureFixture) -> None:
    dom = FakeDom(freeze=lv_error("fsfreeze failed"), thaw_failures=5)
    q = run(dom)
    assert dom.calls[-2:] == ["begin", "thaw"]
    assert q.consistency == "crash"
    assert any("cannot freeze" in w for w in warnings_of(logs))


def test_thaw_is_retried(logs: pytest.LogCaptureFixture) -> None:
    dom = FakeDom(thaw_failures=2)
    q = run(dom)
    assert dom.calls.count("thaw") == 3 and q.consistency == "filesystem"


def test_thaw_that_keeps_failing_is_an_error() -> None:
    dom = FakeDom(thaw_failures=agent.THAW_ATTEMPTS)
    with pytest.raises(errors.AgentError, match="virsh domfsthaw fake"):
        run(dom)
    assert dom.calls.count("thaw") == agent.THAW_ATTEMPTS


def test_job_failure_wins_over_thaw_failure(logs: pytest.LogCaptureFixture) -> None:
    dom = FakeDom(thaw_failures=agent.THAW_ATTEMPTS)
    with pytest.raises(ValueError, match="begin failed"), agent.quiesced(dom, agent.QuiesceOptions()):
        raise ValueError("begin failed")
    assert dom.calls.count("thaw") == agent.THAW_ATTEMPTS
    assert any("cannot thaw" in r.getMessage() for r in logs.records if r.levelno == logging.ERROR)


def test_job_failure_thaws(logs: pytest.LogCaptureFixture) -> None:
    dom = FakeDom()
    with pytest.raises(errors.LibvirtError), agent.quiesced(dom, agent.QuiesceOptions()):
        raise errors.LibvirtError(reason="cannot start backup job")
    assert dom.calls[-1] == "thaw"


def test_no_freeze_keeps_facts_without_warning(logs: pytest.LogCaptureFixture) -> None:
    dom = FakeDom()
    q = run(dom, freeze=False)
    assert q.consistency == "crash" and q.guest_info["hostname"] == "g1"
    assert not any(c.startswith("freeze") for c in dom.calls) and not warnings_of(logs)


def test_pause_suspends_and_resumes(logs: pytest.LogCaptureFixture) -> None:
    dom = FakeDom(channel=None)
    q = run(dom, pause=True)
    assert dom.calls == ["suspend", "begin", "resume"] and q.consistency == "paused"
    assert not warnings_of(logs)
    dom = FakeDom(channel=None)
    with pytest.raises(ValueError), agent.quiesced(dom, agent.QuiesceOptions(pause=True)):
        raise ValueError("begin failed")
    assert dom.calls[-1] == "resume"


def test_paused_domain_is_left_paused() -> None:
    dom = FakeDom(state=libvirt.VIR_DOMAIN_PAUSED)
    q = run(dom, pause=True)
    assert dom.calls == ["begin"] and q.consistency == "paused"
    q = run(FakeDom(state=libvirt.VIR_DOMAIN_PAUSED))
    assert q.consistency == "crash"


def test_shut_off_domain_is_offline() -> None:
    dom = FakeDom(state=libvirt.VIR_DOMAIN_SHUTOFF)
    assert run(dom).consistency == "offline" and dom.calls == ["begin"]


def test_signals_are_held_until_the_window_closes() -> None:
    got: list[int] = []
    saved = signal.signal(signal.SIGTERM, lambda s, _f: got.append(s))
    try:
        with agent._signals_held():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)
            assert got == []
        time.sleep(0.01)
        assert got == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, saved)


def test_cli_rejects_relative_freeze_mountpoints() -> None:
    from virtnbd.cli.backup import parse

    with pytest.raises(errors.UsageError, match="absolute guest paths: data"):
        parse(["-d", "vm", "-o", "/b", "-F", "/,data"])
    assert parse(["-d", "vm", "-o", "/b", "-F", "/,/var", "-F", "/srv"]).quiesce.mountpoints == ("/", "/var", "/srv")
