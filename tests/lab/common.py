"""Basics every lab module shares: sizes, the lab error, running tools, skipping when a tool is absent."""
from __future__ import annotations

import importlib
import os
import shutil
import subprocess
from collections.abc import Sequence

import pytest

KiB = 1024
MiB = 1024 * KiB


class LabError(RuntimeError):
    """The lab could not do what a test asked (not a product error)."""


def run(cmd: Sequence[str], *, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run a command (no shell), capture text output, raise LabError with stderr on failure."""
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise LabError(f"{' '.join(cmd)} -> exit {proc.returncode}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def require(what: str, tools: Sequence[str], modules: Sequence[str] = (), root: bool = False) -> None:
    """Skip (a failure in CI, see tests/conftest.py) unless tools, modules and root are there."""
    missing = [t for t in tools if not shutil.which(t)]
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(f"python module {name}")
    if missing:
        pytest.skip(f"{what}: missing {', '.join(missing)}")
    if root and os.geteuid() != 0:
        pytest.skip(f"{what}: needs root")
