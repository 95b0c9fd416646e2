"""One version, shown the same everywhere: `outbox --version` prints outbox.__version__,
the value setuptools puts in the wheel's metadata (tests/packaging checks the wheel)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import outbox

ROOT = Path(__file__).resolve().parents[2]


def test_version_is_a_release_number() -> None:
    assert re.fullmatch(r"\d+\.\d+\.\d+", outbox.__version__), outbox.__version__


def test_cli_prints_the_package_version() -> None:
    done = subprocess.run([sys.executable, "-m", "outbox.cli", "--version"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"outbox, version {outbox.__version__}\n"


def test_pyproject_reads_the_version_from_the_package() -> None:
    """No second copy of the number: pyproject.toml declares it dynamic, from the package."""
    text = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^dynamic = \["version"\]', text, flags=re.M)
    assert 'version = {attr = "outbox.__version__"}' in text
    assert not re.search(r'^version = "', text, flags=re.M)
