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


def test_changelog_has_an_entry_for_this_version() -> None:
    """CHANGELOG.md keeps Keep a Changelog's shape: an Unreleased section first, then
    releases newest first, each `## [X.Y.Z] - YYYY-MM-DD` with the standard kinds of
    change; the newest release is the package's version."""
    text = (ROOT / "CHANGELOG.md").read_text()
    sections = re.findall(r"^## \[([^\]]+)\](?: - (\d{4}-\d{2}-\d{2}))?$", text, flags=re.M)
    assert sections[0] == ("Unreleased", "")
    releases = sections[1:]
    assert releases and all(date for _, date in releases), releases
    assert releases[0][0] == outbox.__version__
    versions = [tuple(int(n) for n in v.split(".")) for v, _ in releases]
    assert versions == sorted(versions, reverse=True)
    kinds = set(re.findall(r"^### (.+)$", text, flags=re.M))
    assert kinds and kinds <= {"Added", "Changed", "Deprecated", "Removed", "Fixed",
                               "Security"}, kinds
