"""The README and the documentation site tell the truth: their Python blocks run as
written, their commands and flags exist, their links resolve, and the site builds.

Each Python block runs the way a reader would run it: saved to a file of its own and run
with a fresh interpreter, not exec'ed into a namespace shared with earlier blocks (which
once hid an example that forgot `import sqlalchemy as sa`). An HTML comment on the line
before each ```python fence says which file the block belongs to:

    <!-- file: quickstart.py -->     the block starts the file quickstart.py
    <!-- continues -->               the block is appended to the previous block's file

Each page (README.md, and every Markdown file under docs/) gets a temporary directory of
its own; its files are written there and run in page order with that directory as the
working directory, so a file a block creates (the `shop.db` SQLite database) is there for
the blocks after it on the same page, as in a reader's own directory. No page relies on
another page's files. A file that defines `test_` functions runs under pytest and must
pass at least one test; any other file runs with `python FILE`. Then each file is checked
for what its blocks promise (CHECKS): rows and events written, an outbox drained,
consumers that load and apply each event once. A fragment that is not a program uses
another fence (```text, ```diff), never ```python.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import pytest

from outbox.cli import main

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
TEXTS = {page.relative_to(ROOT).as_posix(): page.read_text() for page in PAGES}
FENCE = re.compile(r"(?:^<!--\s*(?P<mark>[^>]*?)\s*-->\n)?^```python\n(?P<code>.*?)^```",
                   flags=re.S | re.M)


def blocks(lang: str, text: str | None = None) -> list[str]:
    """The `lang` blocks of one text, or of every page."""
    texts = [text] if text is not None else list(TEXTS.values())
    return [b for t in texts for b in re.findall(rf"^```{lang}\n(.*?)^```", t, flags=re.S | re.M)]


@dataclass
class Program:
    """One file a reader would save: a standalone block and the blocks that continue it."""

    path: str
    blocks: list[str] = field(default_factory=list)

    @property
    def code(self) -> str:
        return "\n".join(self.blocks)

    @property
    def is_test_module(self) -> bool:
        return re.search(r"^def test_", self.code, flags=re.M) is not None


def programs(text: str = README, page: str = "README.md") -> list[Program]:
    """A page's Python blocks grouped into files by their marker comments."""
    out: list[Program] = []
    for m in FENCE.finditer(text):
        mark, code = m["mark"] or "", m["code"]
        line = text.count("\n", 0, m.start("code"))
        if mark == "continues":
            if not out:
                raise AssertionError(f"{page}:{line}: the first Python block cannot continue")
            out[-1].blocks.append(code)
        elif mark.startswith("file:"):
            out.append(Program(mark.removeprefix("file:").strip(), [code]))
        else:
            raise AssertionError(
                f"{page}:{line}: a ```python block needs `<!-- file: NAME.py -->` or "
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


@pytest.mark.parametrize("page", TEXTS)
def test_every_python_block_belongs_to_a_file(page: str) -> None:
    found = programs(TEXTS[page], page)
    assert sum(len(p.blocks) for p in found) == len(blocks("python", TEXTS[page]))
    assert len({p.path for p in found}) == len(found), "two programs write the same file"


def test_markers_group_blocks() -> None:
    """The grouping itself: a continued block joins the file before it, in order."""
    text = ("<!-- file: a.py -->\n```python\nx = 1\n```\nprose\n"
            "<!-- continues -->\n```python\nprint(x)\n```\n"
            "<!-- file: b.py -->\n```python\ny = 2\n```\n")
    found = programs(text)
    assert [(p.path, p.code) for p in found] == [("a.py", "x = 1\n\nprint(x)\n"),
                                                ("b.py", "y = 2\n")]
    assert [p.is_test_module for p in found] == [False, False]
    assert Program("t.py", ["def test_x() -> None:\n    assert 2 + 2 == 4\n"]).is_test_module
    with pytest.raises(AssertionError, match="needs `<!-- file"):
        programs("```python\nz = 3\n```\n")


RUNNABLE = [page for page, text in TEXTS.items() if programs(text, page)]


@pytest.mark.parametrize("page", RUNNABLE)
def test_python_blocks_run_as_files(page: str, tmp_path: Path) -> None:
    """Every file of a page runs on its own, in order, and does what its blocks promise;
    every consumer an `outbox consume` line of the page names loads from its files."""
    found = programs(TEXTS[page], page)
    expected = {path for (p, path) in CHECKS if p == page}
    assert expected <= {p.path for p in found}, f"{page}: a checked file is gone"
    for program in found:
        path = tmp_path / program.path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(program.code)
        lint = subprocess.run([sys.executable, "-m", "ruff", "check", "--isolated",
                               "--select", "F", program.path], cwd=tmp_path,
                              capture_output=True, text=True, timeout=60)
        assert lint.returncode == 0, f"{page} {program.path}: undefined or unused names:\n" \
                                     f"{lint.stdout}"
        if program.is_test_module:
            done = run_python(["-m", "pytest", "-q", "-p", "no:cacheprovider",
                               program.path], tmp_path)
            assert done.returncode == 0 and re.search(r"^\d+ passed", done.stdout, flags=re.M), \
                f"{page} {program.path} failed under pytest:\n{done.stdout}\n{done.stderr}"
        else:
            done = run_python([program.path], tmp_path)
            assert done.returncode == 0, f"{page} {program.path} failed:\n{done.stderr}"
        check = CHECKS.get((page, program.path))
        if check is not None:
            check(tmp_path, done.stdout)
    targets = re.findall(r"^outbox consume (\S+)", "\n".join(blocks("bash", TEXTS[page])),
                         flags=re.M)
    for target in targets:
        check_consumer_loads(tmp_path, target)


def check_quickstart(tmp: Path, stdout: str) -> None:
    """Rows and events committed together: two orders, two events, the id it printed."""
    db = tmp / "shop.db"
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


def check_consumer_loads(tmp: Path, target: str) -> None:
    """What `outbox consume TARGET` does first: load it from the page's directory and
    validate it."""
    script = f"""
import sys
from outbox.consumer import load_consumer

sys.path.insert(0, ".")  # as `outbox consume` does
consumer = load_consumer({target!r})
consumer.validate()
print(type(consumer).__name__, consumer.group_id, consumer.id_header)
"""
    done = run_python(["-c", script], tmp)
    assert done.returncode == 0, f"{target} cannot be consumed as written:\n{done.stderr}"


def check_projector_handles(tmp: Path, stdout: str) -> None:
    """One real `handle` of the quickstart's consumer, on an event as the consumer decodes
    it from its Kafka record, on a real session of the page's database."""
    script = """
import sys
import sqlalchemy as sa
from sqlalchemy.orm import Session
from outbox import Event
from outbox.consumer import load_consumer
from outbox.event import from_record
from outbox.serde import decode

sys.path.insert(0, ".")
consumer = load_consumer("myapp.projections:Projector")
sent = Event(topic="orders", key="1", type="OrderPlaced", payload=None,
             data=b'{"id": 1, "amount": "42.00"}')
key, value, headers = sent.to_record()
event = from_record(topic="orders", key=key, value=value, headers=headers, decode=decode)
with Session(sa.create_engine("sqlite:///shop.db")) as session, session.begin():
    consumer.handle(event, session)
print("handled", event.id)
"""
    done = run_python(["-c", script], tmp)
    assert done.returncode == 0, f"the quickstart's consumer cannot handle:\n{done.stderr}"
    assert done.stdout.startswith("handled ")


def check_drained(tmp: Path, stdout: str) -> None:
    """drain() published the committed events (the block asserts which) and the outbox
    is empty afterwards."""
    assert rows(tmp / "shop.db", "SELECT count(*) FROM outbox_events") == [(0,)]


def check_consumers_applied(tmp: Path, stdout: str) -> None:
    """Each of the page's five consumers applied two events and skipped one duplicate."""
    assert stdout.splitlines() == [
        f"{target}: 2 applied, 1 duplicate skipped"
        for target in ("projections:Projector", "batch_projections:BatchProjector",
                       "async_projections:AsyncProjector", "function_projections:project",
                       "receipts:send_receipt")]


def check_testing_guide(tmp: Path, stdout: str) -> None:
    assert re.search(r"^3 passed", stdout, flags=re.M), stdout


def check_migrated(tmp: Path, stdout: str) -> None:
    names = {name for (name,) in rows(tmp / "app.db",
                                      "SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"outbox_events", "outbox_dead_letters", "outbox_shards", "outbox_inbox",
            "outbox_attempts", "outbox_alembic_version"} <= names


def check_debezium_consumer(tmp: Path, stdout: str) -> None:
    """The Debezium page's consumer reads the event id from Debezium's `id` header."""
    done = run_python(["-c", "from outbox.consumer import load_consumer; "
                             "print(load_consumer('debezium_projector:Projector').id_header)"],
                      tmp)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "id"


CHECKS: dict[tuple[str, str], Callable[[Path, str], None]] = {
    ("README.md", "quickstart.py"): check_quickstart,
    ("README.md", "myapp/projections.py"): check_projector_handles,
    ("README.md", "test_outbox.py"): check_drained,
    ("docs/getting-started.md", "quickstart.py"): check_quickstart,
    ("docs/getting-started.md", "myapp/projections.py"): check_projector_handles,
    ("docs/getting-started.md", "check.py"): check_drained,
    ("docs/consumers.md", "try_consumers.py"): check_consumers_applied,
    ("docs/testing.md", "test_orders.py"): check_testing_guide,
    ("docs/upgrades.md", "migrate_app.py"): check_migrated,
    ("docs/debezium.md", "debezium_projector.py"): check_debezium_consumer,
}


def test_every_page_with_python_has_a_check() -> None:
    """A page whose programs are only run (no CHECKS entry) would prove little."""
    checked = {page for page, _ in CHECKS}
    assert set(RUNNABLE) == checked


def test_relative_links_resolve() -> None:
    """Links from the README, the changelog and the docs to files of the repo point at
    existing files."""
    pages = [*PAGES, ROOT / "CHANGELOG.md"]
    assert ROOT / "docs" / "design.md" in pages
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" not in target and not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken


def test_readme_links_into_the_site() -> None:
    """The README is the pitch; it sends readers to the site's pages, relatively, so the
    links work on GitHub as well."""
    linked = set(re.findall(r"\]\((docs/[a-z-]+\.md)(?:#[^)]*)?\)", README))
    assert {"docs/getting-started.md", "docs/design.md", "docs/consumers.md",
            "docs/production.md", "docs/testing.md", "docs/configuration.md",
            "docs/versioning.md"} <= linked


def test_nothing_cites_a_design_document_outside_the_repo() -> None:
    """The design document is docs/design.md; no file cites another one."""
    name = "DESIGN" + ".md"  # spelled apart so this file does not cite it either
    citing = [str(path.relative_to(ROOT))
              for top in ("outbox", "tests", "docs", "examples", "benchmarks", "migrations")
              for path in (ROOT / top).rglob("*") if path.suffix in {".py", ".md", ".txt"}
              if name in path.read_text(errors="replace")]
    citing += [f for f in ("README.md", "CHANGELOG.md", "mkdocs.yml")
               if name in (ROOT / f).read_text()]
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
    assert {"demo", "test", "docs"} <= used
    assert used <= targets


def test_stack_subcommands_exist() -> None:
    usage = subprocess.run([str(ROOT / "scripts" / "stack"), "help"], capture_output=True,
                           text=True, timeout=30).stdout
    used = {cmd for text in TEXTS.values()
            for cmd in re.findall(r"scripts/stack ([a-z-]+)", text)}
    assert used
    for cmd in used:
        assert re.search(rf"^\s+{cmd}\b", usage, flags=re.M), cmd


def outbox_help(*words: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "outbox.cli", *words, "--help"],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "COLUMNS": "200"})


def test_outbox_commands_and_flags_exist() -> None:
    used = set(re.findall(r"^outbox ([a-z-]+(?: [a-z][a-z-]*)?)",
                          "\n".join(blocks("bash")), flags=re.M))
    assert {"relay", "consume", "db", "status"} <= {cmd.split()[0] for cmd in used}
    for cmd in used:
        words = cmd.split()
        out = outbox_help(*words)
        if out.returncode != 0:  # "relay --db" style: the second word is not a subcommand
            out = outbox_help(words[0])
        assert out.returncode == 0, cmd
    flags = {f for text in TEXTS.values() for f in re.findall(r"`(--[a-z-]+)`", text)}
    helps = "".join(outbox_help(*c).stdout
                    for c in (["relay"], ["consume"], ["status"], ["db", "upgrade"],
                              ["dead-letters", "list"], []))
    missing = {f for f in flags if f not in helps and f not in {"--all", "--wait", "--strict"}}
    assert not missing, missing


def cli_commands(group: click.Command, path: str = "") -> list[tuple[str, click.Command]]:
    found = [(path, group)]
    if isinstance(group, click.Group):
        for name, sub in group.commands.items():
            found += cli_commands(sub, f"{path} {name}".strip())
    return found


def test_configuration_reference_lists_every_option() -> None:
    """docs/configuration.md has a row for each option of each command, with its flag and
    its variable; and each variable it names exists."""
    text = (ROOT / "docs" / "configuration.md").read_text()
    documented = set()
    for line in text.splitlines():
        cells = line.split(" | ")
        if line.startswith("| ") and len(cells) >= 4:
            flags = re.findall(r"`(--[a-z-]+)`|(TARGET)", cells[1])
            for flag in ("".join(f) for f in flags):
                documented |= {(flag, var) for var in re.findall(r"`(OUTBOX_[A-Z_]+)`",
                                                                 cells[2])}
    known = set()
    for path, command in cli_commands(main):
        for param in command.params:
            if isinstance(param, click.Option) and param.envvar:
                known.add((param.opts[0], param.envvar))
                assert (param.opts[0], param.envvar) in documented, \
                    f"outbox {path} {param.opts[0]} ({param.envvar}) is not in the table"
            elif isinstance(param, click.Argument) and param.envvar:
                known.add(("TARGET", param.envvar))
    assert documented <= known, documented - known


def test_least_privilege_grants_are_the_tested_ones() -> None:
    """The GRANTs the production guide shows are the ones the least-privilege
    integration test runs (less the demo's own tables there)."""
    shown = blocks("sql", TEXTS["docs/production.md"])
    [grants] = [b for b in shown if "GRANT" in b]
    documented = {re.sub(r"TO \w+;", "TO role;", line) for line in grants.splitlines()
                  if line.startswith("GRANT")}
    source = (ROOT / "tests" / "integration" / "test_least_privilege.py").read_text()
    tested = {re.sub(r"TO \{\w+\};", "TO role;", line) for line in source.splitlines()
              if line.startswith("GRANT") and "outbox_" in line}
    assert documented == tested


def test_site_titles_each_block_with_its_file() -> None:
    """The site's hook turns the (invisible) markers into code block titles."""
    spec = importlib.util.spec_from_file_location("mkdocs_hooks",
                                                  ROOT / "docs" / "hooks.py")
    assert spec is not None and spec.loader is not None
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    text = ("<!-- file: a.py -->\n```python\nx = 1\n```\n"
            "<!-- continues -->\n```python\nprint(x)\n```\n```bash\nls\n```\n")
    assert hooks.titled(text) == ('```python title="a.py"\nx = 1\n```\n'
                                  '```python title="a.py (continued)"\nprint(x)\n```\n'
                                  "```bash\nls\n```\n")


def test_site_builds_strictly(tmp_path: Path) -> None:
    """`make docs` in a test: mkdocs --strict fails on a broken link or anchor, a page
    left out of the navigation, or a docstring the API reference cannot render."""
    mkdocs = Path(sys.executable).with_name("mkdocs")
    done = subprocess.run([str(mkdocs), "build", "--strict", "--site-dir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stderr
    assert "WARNING" not in done.stderr, done.stderr
    for page in ("index.html", "getting-started/index.html", "cli/index.html",
                 "api/index.html", "changelog/index.html"):
        assert (tmp_path / page).exists(), page
    cli_page = (tmp_path / "cli" / "index.html").read_text()
    assert "--exactly-once" in cli_page and "OUTBOX_DATABASE_URL" in cli_page
    consumers_page = (tmp_path / "consumers" / "index.html").read_text()
    assert 'class="filename">try_consumers.py<' in consumers_page
    api_page = (tmp_path / "api" / "index.html").read_text()
    assert "outbox.Outbox" in api_page and "InMemoryBroker" in api_page
