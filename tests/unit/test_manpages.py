"""The man pages stay in step with --help: every long option is documented.

Every CLI module must expose ``build_parser() -> argparse.ArgumentParser``.
A missing module, function or page FAILS (never skips): the pages ship with
the commands.
"""
from __future__ import annotations

import argparse
import importlib
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMMANDS = [("virtnbdbackup", "virtnbd.cli.backup"), ("virtnbdrestore", "virtnbd.cli.restore"),
            ("virtnbdprune", "virtnbd.cli.prune"), ("virtnbdmap", "virtnbd.cli.map"),
            ("virtnbdmount", "virtnbd.cli.mount"), ("virtnbdjob", "virtnbd.cli.job"), ("virtnbdkey", "virtnbd.cli.key")]


def load_parser(module_name: str) -> argparse.ArgumentParser:
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        pytest.fail(f"{module_name} cannot be imported: {err}")
    build = getattr(module, "build_parser", None)
    if build is None:
        pytest.fail(f"{module_name} has no build_parser() (the contract: it returns the argparse parser)")
    parser = build()
    assert isinstance(parser, argparse.ArgumentParser)
    return parser


def long_options(parser: argparse.ArgumentParser) -> set[str]:
    return {opt for action in parser._actions for opt in action.option_strings if opt.startswith("--")}


def man_text(page: Path) -> str:
    """The page with roff escapes removed: ``\\-`` -> ``-``, fonts ``\\fB`` dropped."""
    if not page.exists():
        pytest.fail(f"man page {page.relative_to(ROOT)} is missing")
    return unroff(page.read_text())


def unroff(raw: str) -> str:
    text = re.sub(r"\\f[BIRP]|\\f\(..|\\f\[[^]]*\]", "", raw)
    return text.replace("\\-", "-").replace("\\(hy", "-").replace("\\&", "")


def documented(option: str, text: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text) is not None


@pytest.mark.parametrize(("command", "module_name"), COMMANDS)
def test_every_long_option_is_in_the_man_page(command: str, module_name: str) -> None:
    parser = load_parser(module_name)
    options = long_options(parser)
    assert "--help" in options and len(options) > 3
    text = man_text(ROOT / "man" / f"{command}.1")
    missing = sorted(o for o in options if not documented(o, text))
    assert not missing, f"man/{command}.1 does not document {', '.join(missing)}"


@pytest.mark.parametrize(("command", "module_name"), COMMANDS)
def test_every_long_option_is_in_help(command: str, module_name: str) -> None:
    parser = load_parser(module_name)
    help_text = parser.format_help()
    missing = sorted(o for o in long_options(parser) if not documented(o, help_text))
    assert not missing, f"{command} --help does not show {', '.join(missing)}"


@pytest.mark.parametrize(("command", "module_name"), COMMANDS)
def test_man_page_names_its_command(command: str, module_name: str) -> None:
    text = man_text(ROOT / "man" / f"{command}.1")
    assert re.search(rf"^\.TH\s+\"?{command}\"?\s", text, re.MULTILINE | re.IGNORECASE), f"{command}.1 has no .TH"
    assert load_parser(module_name).prog == command


def test_documented_detects_a_missing_option() -> None:
    text = unroff("\\fB\\-\\-until\\fR POINT\n.TP\n\\-\\-output\\-dir\n")
    assert documented("--until", text)
    assert not documented("--output", text)
    assert documented("--output-dir", text)


@pytest.mark.parametrize(("command", "module_name"), COMMANDS)
def test_man_page_renders_without_warnings(command: str, module_name: str) -> None:
    from tests.lab.common import require

    require("man page check", ("groff",))
    page = ROOT / "man" / f"{command}.1"
    if not page.exists():
        pytest.fail(f"man page man/{command}.1 is missing")
    proc = subprocess.run(["groff", "-man", "-ww", "-z", str(page)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0 and not proc.stderr.strip(), f"groff warnings for {command}.1:\n{proc.stderr}"
