"""The CI rule of the test suite, as a pytest plugin: with ``CI=true`` every skip is a failure.

A green CI must mean the real libvirt/QEMU/Ceph/guest tests ran. Locally a missing
service skips. Every kind of skip is caught:

* while a test runs or in its setup (``pytest.skip()``, ``@pytest.mark.skip``,
  ``skipif``, ``importorskip`` in a fixture): the test's report becomes a failure;
* while a module is collected (module-level ``pytest.importorskip``,
  ``pytest.skip(allow_module_level=True)``): the collect report becomes an error;
* anything that still reports "skipped" (another plugin, a future pytest): the
  session's exit status is made non-zero at the end.

``tests/conftest.py`` imports these hooks; tests/unit/test_ci_skip_hook.py runs
samples of each kind in a subprocess with ``-p tests.ci_skip_rule``.
"""
from __future__ import annotations

import os
from collections.abc import Generator
from typing import Any

import pytest

CI_MESSAGE = "skipped in CI is a failure"


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _as_failure(report: pytest.TestReport | pytest.CollectReport) -> None:
    report.outcome = "failed"
    report.longrepr = f"{CI_MESSAGE}: {report.longrepr}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    outcome = yield
    report = outcome.get_result()
    if in_ci() and report.skipped and not hasattr(report, "wasxfail"):
        _as_failure(report)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Generator[None, Any, None]:
    outcome = yield
    report = outcome.get_result()
    if in_ci() and report.skipped:
        _as_failure(report)


_SKIPS_SEEN: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        _SKIPS_SEEN.append(report.nodeid)


def pytest_collectreport(report: pytest.CollectReport) -> None:
    if report.skipped:
        _SKIPS_SEEN.append(report.nodeid)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if in_ci() and _SKIPS_SEEN and exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    if in_ci() and _SKIPS_SEEN:
        terminalreporter.write_line(f"{CI_MESSAGE}: {len(_SKIPS_SEEN)} skipped: {', '.join(_SKIPS_SEEN[:10])}",
                                    red=True)
