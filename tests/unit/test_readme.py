"""The README tells the truth: its Python blocks run as written, its commands exist.

Each Python block runs the way a reader would run it: saved to a file of its own and run
with a fresh interpreter, not exec'ed into a namespace shared with earlier blocks (which
once hid an example that forgot `import sqlalchemy as sa`). An HTML comment on the line
before each ```python fence says which file the block belongs to:

    <!-- file: quickstart.py -->     the block starts the file quickstart.py
    <!-- continues -->               the block is appended to the previous block's file

Files are written to one temporary directory and run in README order with that directory
as the working directory, so a file a block creates (the `shop.db` SQLite database) is
there for the blocks after it, as in a reader's own directory. Then each file is checked
for what its blocks promise: rows and events written, a consumer `outbox consume` can
load and run, an outbox drained.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
FENCE = re.compile(r"(?:^<!--\s*(?P<mark>[^>]*?)\s*-->\n)?^```python\n(?P<code>.*?)^```",
                   flags=re.S | re.M)


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


@dataclass
class Program:
    """One file a reader would save: a standalone block and the blocks that continue it."""

    path: str
    blocks: list[str] = field(default_factory=list)

    @property
    def code(self) -> str:
        return "\n".join(self.blocks)


def programs(readme: str = README) -> list[Program]:
    """The README's Python blocks grouped into files by their marker comments."""
    out: list[Program] = []
    for m in FENCE.finditer(readme):
        mark, code = m["mark"] or "", m["code"]
        line = readme.count("\n", 0, m.start("code"))
        if mark == "continues":
            if not out:
                raise AssertionError(f"README.md:{line}: the first Python block cannot continue")
            out[-1].blocks.append(code)
        elif mark.startswith("file:"):
            out.append(Program(mark.removeprefix("file:").strip(), [code]))
        else:
            raise AssertionError(
                f"README.md:{line}: a ```python block needs `<!-- file: NAME.py -->` or "
                "`<!-- continues -->` on the line before it (see tests/unit/test_readme.py)")
    return out


def run_python(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """A fresh interpreter, as a reader's `python FILE` (no test-suite state leaks in)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OUTBOX_", "PYTHON"))}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def rows(db: Path, sql: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(db) as conn:
        return list(conn.execute(sql))


def test_every_python_block_belongs_to_a_file() -> None:
    found = programs()
    assert sum(len(p.blocks) for p in found) == len(blocks("python"))
    assert len({p.path for p in found}) == len(found), "two programs write the same file"


def test_markers_group_blocks() -> None:
    """The grouping itself: a continued block joins the file before it, in order."""
    text = ("<!-- file: a.py -->\n```python\nx = 1\n```\nprose\n"
            "<!-- continues -->\n```python\nprint(x)\n```\n"
            "<!-- file: b.py -->\n```python\ny = 2\n```\n")
    found = programs(text)
    assert [(p.path, p.code) for p in found] == [("a.py", "x = 1\n\nprint(x)\n"),
                                                ("b.py", "y = 2\n")]
    with pytest.raises(AssertionError, match="needs `<!-- file"):
        programs("```python\nz = 3\n```\n")


def test_python_blocks_run_as_files(tmp_path: Path) -> None:
    """Every README file runs on its own, in order, and does what its blocks promise."""
    found = programs()
    by_path = {p.path: p for p in found}
    assert {"quickstart.py", "myapp/projections.py", "test_outbox.py"} <= set(by_path)
    db = tmp_path / "shop.db"
    for program in found:
        path = tmp_path / program.path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(program.code)
        lint = subprocess.run([sys.executable, "-m", "ruff", "check", "--isolated",
                               "--select", "F", program.path], cwd=tmp_path,
                              capture_output=True, text=True, timeout=60)
        assert lint.returncode == 0, f"{program.path}: undefined or unused names:\n{lint.stdout}"
        done = run_python([program.path], tmp_path)
        assert done.returncode == 0, f"{program.path} failed:\n{done.stderr}"
        check = CHECKS.get(program.path)
        if check is not None:
            check(tmp_path, db, done.stdout)
    # the command the README gives for the consumer points at the README's own consumer
    targets = re.findall(r"^outbox consume (\S+)", "\n".join(blocks("bash")), flags=re.M)
    assert targets == ["myapp.projections:Projector"]
    check_consumer_loads(tmp_path, db, targets[0])


def check_quickstart(tmp: Path, db: Path, stdout: str) -> None:
    """Rows and events committed together: two orders, two events, the id it printed."""
    assert db.exists()
    assert rows(db, "SELECT id, customer_id, amount FROM orders ORDER BY id") == [
        (1, 7, 42), (2, 8, 10)]
    events = rows(db, "SELECT event_id, topic, key, type, payload, headers "
                      "FROM outbox_events ORDER BY position")
    assert [(t, k, ty) for _, t, k, ty, _, _ in events] == [
        ("orders", "1", "OrderPlaced"), ("orders", "customer-8", "OrderPlaced")]
    assert json.loads(events[0][4]) == {"id": 1, "amount": "42.00"}
    assert json.loads(events[1][4]) == {"amount": "10.00"}
    assert json.loads(events[1][5]) == {"tenant": "eu"}
    printed = uuid.UUID(stdout.split()[-1])
    assert printed.version == 7
    assert printed == uuid.UUID(str(events[1][0]))


def check_consumer_loads(tmp: Path, db: Path, target: str) -> None:
    """What `outbox consume TARGET` does first (load, validate), then one real `handle`
    of an event as the consumer decodes it from its Kafka record, on a real session."""
    script = f"""
import sys
import sqlalchemy as sa
from sqlalchemy.orm import Session
from outbox import Event
from outbox.consumer import load_consumer
from outbox.event import from_record
from outbox.serde import decode

sys.path.insert(0, ".")  # as `outbox consume` does
consumer = load_consumer({target!r})
consumer.validate()
sent = Event(topic="orders", key="1", type="OrderPlaced", payload=None,
             data=b'{{"id": 1, "amount": "42.00"}}')
key, value, headers = sent.to_record()
event = from_record(topic="orders", key=key, value=value, headers=headers, decode=decode)
with Session(sa.create_engine("sqlite:///shop.db")) as session, session.begin():
    consumer.handle(event, session)
print("handled", event.id)
"""
    done = run_python(["-c", script], tmp)
    assert done.returncode == 0, f"{target} cannot be consumed as written:\n{done.stderr}"
    assert done.stdout.startswith("handled ")


def check_testing(tmp: Path, db: Path, stdout: str) -> None:
    """drain() published the committed events (the block asserts which) and the outbox
    is empty afterwards."""
    assert rows(db, "SELECT count(*) FROM outbox_events") == [(0,)]


CHECKS = {"quickstart.py": check_quickstart, "test_outbox.py": check_testing}


def test_relative_links_resolve() -> None:
    """Links from the README and the docs to files of the repo point at existing files."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    assert ROOT / "docs" / "design.md" in pages
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" not in target and not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken


def test_nothing_cites_a_design_document_outside_the_repo() -> None:
    """The design document is docs/design.md; no file cites another one."""
    name = "DESIGN" + ".md"  # spelled apart so this file does not cite it either
    citing = [str(path.relative_to(ROOT))
              for top in ("outbox", "tests", "docs", "examples", "benchmarks", "migrations")
              for path in (ROOT / top).rglob("*") if path.suffix in {".py", ".md", ".txt"}
              if name in path.read_text(errors="replace")]
    if name in README:
        citing.append("README.md")
    assert not citing


def test_design_sections_cited_by_the_code_exist() -> None:
    """`docs/design.md, "Section"` in a docstring names a heading of the design doc."""
    headings = set(re.findall(r"^#+ (.+)$", (ROOT / "docs" / "design.md").read_text(),
                              flags=re.M))
    cited = {(path.name, section) for path in (ROOT / "outbox").rglob("*.py")
             for section in re.findall(r'docs/design\.md, "([^"]+)"', path.read_text())}
    assert not {c for c in cited if c[1] not in headings}


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
