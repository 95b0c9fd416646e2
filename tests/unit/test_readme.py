"""The README tells the truth: its Python blocks run as written, its commands exist."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_python_blocks_run_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "readme"}
    for code in blocks("python"):
        exec(compile(code, "README.md", "exec", dont_inherit=True), namespace)
    assert (tmp_path / "shop.db").exists()


def test_make_targets_exist() -> None:
    targets = set(re.findall(r"^([a-z-]+):", (ROOT / "Makefile").read_text(), flags=re.M))
    used = set(re.findall(r"^make ([a-z-]+)", "\n".join(blocks("bash")), flags=re.M))
    assert used and used <= targets


def test_stack_subcommands_exist() -> None:
    usage = subprocess.run([str(ROOT / "scripts" / "stack"), "help"], capture_output=True,
                           text=True, timeout=30).stdout
    used = set(re.findall(r"scripts/stack ([a-z-]+)", README))
    assert used
    for cmd in used:
        assert re.search(rf"^\s+{cmd}\b", usage, flags=re.M), cmd


def test_outbox_commands_and_flags_exist() -> None:
    env = {**os.environ, "COLUMNS": "200"}
    used = re.findall(r"^outbox ([a-z-]+(?: [a-z]+)?)", "\n".join(blocks("bash")), flags=re.M)
    assert used
    for cmd in used:
        words = cmd.split()
        out = subprocess.run([sys.executable, "-m", "outbox.cli", *words, "--help"],
                             capture_output=True, text=True, timeout=60, env=env)
        if out.returncode != 0:  # "db upgrade" style: second word is the subcommand
            out = subprocess.run([sys.executable, "-m", "outbox.cli", words[0], "--help"],
                                 capture_output=True, text=True, timeout=60, env=env)
        assert out.returncode == 0, cmd
    flags = set(re.findall(r"`(--[a-z-]+)`", README))
    helps = "".join(subprocess.run([sys.executable, "-m", "outbox.cli", *c, "--help"],
                                   capture_output=True, text=True, timeout=60, env=env).stdout
                    for c in (["relay"], ["consume"], ["status"], ["db", "upgrade"], []))
    missing = {f for f in flags if f not in helps and f not in {"--all", "--wait"}}
    assert not missing, missing
