"""Shared pytest configuration.

In CI (``CI=true``) a skipped test is a failed test: a green CI must mean the
real libvirt/QEMU/Ceph/guest tests ran. Locally a missing service skips.
The rule (every kind of skip: at run time, setup, collection) is in tests/ci_skip_rule.py.
"""
from __future__ import annotations

from tests.ci_skip_rule import (  # noqa: F401  (hooks: pytest finds them in this module)
    in_ci,
    pytest_collectreport,
    pytest_make_collect_report,
    pytest_runtest_logreport,
    pytest_runtest_makereport,
    pytest_sessionfinish,
    pytest_terminal_summary,
)

IN_CI = in_ci()

# Lab fixtures (tests/lab/*): imported here so every test module can use them.
# The modules import libvirt/nbd lazily, so unit tests run without them.
from tests.lab.ceph_lab import ceph_cluster  # noqa: E402, F401
from tests.lab.fault_lab import crash_runner, small_fs  # noqa: E402, F401
from tests.lab.guest_lab import guest_build, make_guest, module_guest  # noqa: E402, F401
from tests.lab.libvirt_lab import libvirt_conn, libvirt_daemons, make_domain  # noqa: E402, F401
from tests.lab.nbd_lab import (  # noqa: E402, F401
    nbd_lab,
    nbdkit_data,
    nbdkit_memory,
    nbdkit_server,
    nbdkit_sparse_random,
    qemu_nbd_bitmap,
)
from tests.lab.remote_lab import remote_lab  # noqa: E402, F401
from tests.lab.rgw_lab import s3_bucket, s3_endpoint  # noqa: E402, F401
