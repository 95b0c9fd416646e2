"""What a user installs works: the sdist and the wheel build, pass `twine check`, and the
wheel installed into a fresh virtualenv (outside the repo, no dev dependencies) runs the
`outbox` command and real code paths, alone and with each extra.

One build and one base virtualenv serve the module; each extra is installed on top of
the base (after the base checks ran on it, in the fixture), which is what a user adding
an extra does. It needs PyPI for the build backend and the runtime dependencies, as CI
has; a missing runtime dependency (a plain install once lacked greenlet) fails here
because the code that needs it runs.
"""

from __future__ import annotations

import email
import os
import re
import sqlite3
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import outbox

ROOT = Path(__file__).resolve().parents[2]
VERSION = outbox.__version__

pytestmark = pytest.mark.timeout(900)


def run(args: list[str], cwd: Path, env: dict[str, str] | None = None,
        timeout: float = 600) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    return done


@dataclass
class Dist:
    sdist: Path
    wheel: Path


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Dist:
    """`python -m build`: the sdist, then the wheel built from the sdist (so a file the
    sdist leaves out is missing from the wheel too), in an isolated build environment."""
    out = tmp_path_factory.mktemp("dist")
    done = run([sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)], cwd=out)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    [sdist] = out.glob("*.tar.gz")
    [wheel] = out.glob("*.whl")
    return Dist(sdist, wheel)


@dataclass
class Venv:
    root: Path
    work: Path

    @property
    def python(self) -> str:
        return str(self.root / "bin" / "python")

    @property
    def env(self) -> dict[str, str]:
        """The user's shell in that virtualenv: nothing of the test suite's interpreter,
        the repository or OUTBOX_* settings."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("PYTHON", "OUTBOX_", "VIRTUAL_ENV"))}
        env["PATH"] = f"{self.root / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        env["VIRTUAL_ENV"] = str(self.root)
        return env

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run(list(args), cwd=self.work, env=self.env)

    def outbox(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run(str(self.root / "bin" / "outbox"), *args)

    def script(self, name: str, code: str) -> subprocess.CompletedProcess[str]:
        (self.work / name).write_text(code)
        return self.run(self.python, name)

    def pip_install(self, requirement: str) -> None:
        done = self.run(self.python, "-m", "pip", "install", "-q",
                        "--disable-pip-version-check", requirement)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    def importable(self, module: str) -> bool:
        done = self.run(self.python, "-c", f"import {module}")
        return done.returncode == 0


@pytest.fixture(scope="module")
def venv(dist: Dist, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Venv]:
    """A fresh virtualenv with the wheel and its runtime dependencies, nothing else."""
    base = tmp_path_factory.mktemp("venv")
    work = tmp_path_factory.mktemp("work")
    assert ROOT not in work.parents and ROOT not in base.parents
    done = run([sys.executable, "-m", "venv", str(base / "env")], cwd=base)
    assert done.returncode == 0, done.stderr
    env = Venv(base / "env", work)
    env.pip_install(str(dist.wheel))
    for dev_only in ("pytest", "aiosqlite", "confluent_kafka", "prometheus_client", "mkdocs"):
        assert not env.importable(dev_only), f"{dev_only} came with a plain install"
    yield env


def test_twine_check_passes(dist: Dist) -> None:
    done = run([sys.executable, "-m", "twine", "check", "--strict", str(dist.sdist),
                str(dist.wheel)], cwd=dist.wheel.parent)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("PASSED") == 2, done.stdout


def test_wheel_metadata_carries_the_version_and_extras(dist: Dist) -> None:
    assert dist.wheel.name == f"transactional_outbox-{VERSION}-py3-none-any.whl"
    assert dist.sdist.name == f"transactional_outbox-{VERSION}.tar.gz"
    with zipfile.ZipFile(dist.wheel) as whl:
        names = whl.namelist()
        [meta_name] = [n for n in names if n.endswith(".dist-info/METADATA")]
        meta = email.message_from_string(whl.read(meta_name).decode())
    assert meta["Name"] == "transactional-outbox"
    assert meta["Version"] == VERSION
    assert {"confluent", "metrics", "otel"} <= set(meta.get_all("Provides-Extra") or [])
    requires = " ".join(meta.get_all("Requires-Dist") or [])
    assert re.search(r"sqlalchemy\[asyncio\]", requires, flags=re.I), requires
    # every module of the package (a subpackage left out of pyproject's list once made a
    # wheel whose `import outbox` failed), the migrations and the typing marker
    modules = {f"outbox/{p.relative_to(ROOT / 'outbox').as_posix()}"
               for p in (ROOT / "outbox").rglob("*.py")}
    assert modules <= set(names), sorted(modules - set(names))
    assert "outbox/py.typed" in names
    assert any(re.fullmatch(r"outbox/migrations/versions/0002_\w+\.py", n) for n in names)
    assert "outbox/migrations/script.py.mako" in names


def test_command_help_and_version(venv: Venv) -> None:
    helped = venv.outbox("--help")
    assert helped.returncode == 0, helped.stderr
    for command in ("relay", "consume", "db", "status", "dead-letters"):
        assert re.search(rf"^\s+{command}\b", helped.stdout, flags=re.M), command
    version = venv.outbox("--version")
    assert version.returncode == 0, version.stderr
    assert version.stdout == f"outbox, version {VERSION}\n"


def test_db_upgrade_on_sqlite(venv: Venv) -> None:
    db = venv.work / "upgraded.db"
    done = venv.outbox("db", "upgrade", "--db", f"sqlite:///{db}")
    assert done.returncode == 0, done.stderr
    assert "outbox tables at head" in done.stdout
    with sqlite3.connect(db) as conn:
        tables = {name for (name,) in conn.execute(
            "SELECT name FROM sqlite_master WHERE type='table'")}
        [(revision,)] = conn.execute("SELECT version_num FROM outbox_alembic_version")
    assert {"outbox_events", "outbox_dead_letters", "outbox_shards", "outbox_inbox",
            "outbox_attempts"} <= tables
    assert revision == "0002"


PUBLISH_AND_DRAIN = '''
import asyncio
import sys

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.util import greenlet_spawn

import outbox
from outbox import ConsumerRunner, Event, IdempotentConsumer, Outbox, migrate
from outbox.testing import InMemoryBroker, InMemoryPublisher, drain

assert outbox.__file__.startswith(sys.prefix), outbox.__file__  # the installed wheel
url = "sqlite:///drain.db"
migrate.upgrade(url)
engine = sa.create_engine(url)
box = Outbox()


@box.transactional(sessionmaker(engine))
def place(session: Session, order_id: int) -> None:
    box.publish(session, topic="orders", key=str(order_id), type="OrderPlaced",
                payload={"id": order_id})


place(1)
publisher = InMemoryPublisher()
assert drain(url, publisher) == 1
[record] = publisher.records
assert (record.topic, record.key, record.value) == ("orders", b"1", b'{"id":1}'), record
with engine.connect() as conn:
    assert conn.scalar(sa.text("SELECT count(*) FROM outbox_events")) == 0


class Tally(IdempotentConsumer):
    topics = ["orders"]
    group_id = "tally"
    seen: list[str] = []

    def handle(self, event: Event, session: Session) -> None:
        self.seen.append(event.type)


place(2)
broker = InMemoryBroker()
drain(url, broker.publisher())
runner = ConsumerRunner(Tally(), engine=engine, source=broker.source("tally"),
                        dead_letters=broker.publisher())
runner.run_once()
runner.close()
assert Tally.seen == ["OrderPlaced"], Tally.seen

# The bridge an AsyncIdempotentConsumer's batches run through (outbox/consumer/db.py):
# SQLAlchemy's greenlet_spawn, which needs greenlet at run time.
assert asyncio.run(greenlet_spawn(lambda: 42)) == 42
print("published, drained, consumed")
'''


def test_publish_drain_and_consume(venv: Venv) -> None:
    done = venv.script("publish_and_drain.py", PUBLISH_AND_DRAIN)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "published, drained, consumed\n"


@pytest.mark.parametrize(("flag", "extra"), [(["--client", "confluent"], "confluent"),
                                             (["--metrics-port", "9464"], "metrics")])
def test_a_missing_extra_is_named_without_a_traceback(venv: Venv, flag: list[str],
                                                      extra: str) -> None:
    """Checked before anything connects: no server is needed for the answer."""
    if venv.importable({"confluent": "confluent_kafka", "metrics": "prometheus_client"}[extra]):
        pytest.fail(f"the [{extra}] extra is installed already: test order broken")
    done = venv.outbox("relay", "--db", "postgresql://app@127.0.0.1:9/shop",
                       "--kafka", "127.0.0.1:9", *flag)
    assert done.returncode == 1, done.stderr
    assert f"pip install 'transactional-outbox[{extra}]'" in done.stderr
    assert "Traceback" not in done.stderr


CONFLUENT = '''
from outbox.errors import ConfigError
from outbox.publisher import KafkaSettings, make_publisher

# librdkafka accepts the relay's producer settings; nothing is sent (no broker needed)
publisher = make_publisher("confluent", KafkaSettings("127.0.0.1:9"))
assert publisher.config["enable.idempotence"] is True and publisher.config["acks"] == "all"
publisher.close(0)
try:
    make_publisher("confluent", KafkaSettings("127.0.0.1:9", extra={"acks": "1"}))
except ConfigError as exc:
    print("refused:", exc)
'''

METRICS = '''
import urllib.request

from prometheus_client import CollectorRegistry

from outbox.metrics import RelayMetrics, serve

registry = CollectorRegistry()
metrics = RelayMetrics(registry)
metrics.batch(0.01, 3)
server = serve(0, registry, lambda: True)
port = server.server_address[1]
with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
    body = answer.read().decode()
with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as answer:
    health = answer.status
server.shutdown()
assert "outbox_relay_published_total 3.0" in body, body
print("metrics served, health", health)
'''


OTEL = '''
import sqlalchemy as sa
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
from sqlalchemy.orm import sessionmaker

from outbox import Outbox
from outbox.schema import metadata
from outbox.testing import InMemoryPublisher, drain

# the API alone (no SDK): a span context someone else started is carried in the headers
url = "sqlite:///otel.db"
engine = sa.create_engine(url)
metadata.create_all(engine)
context = SpanContext(trace_id=0x1234, span_id=0x56, is_remote=False,
                      trace_flags=TraceFlags(TraceFlags.SAMPLED))
with trace.use_span(NonRecordingSpan(context)), sessionmaker(engine).begin() as session:
    Outbox().publish(session, topic="t", key="k", type="T", payload=1)
publisher = InMemoryPublisher()
assert drain(url, publisher) == 1
headers = dict(publisher.records[0].headers)
print(headers["traceparent"].decode())
'''


@pytest.mark.parametrize(("extra", "module", "code", "expected"), [
    ("confluent", "confluent_kafka", CONFLUENT,
     "refused: the outbox's producer needs acks=all\n"),
    ("metrics", "prometheus_client", METRICS, "metrics served, health 200\n"),
    ("otel", "opentelemetry.trace", OTEL,
     "00-00000000000000000000000000001234-0000000000000056-01\n"),
])
def test_each_extra_installs_and_works(venv: Venv, dist: Dist, extra: str, module: str,
                                       code: str, expected: str) -> None:
    venv.pip_install(f"{dist.wheel}[{extra}]")
    assert venv.importable(module)
    done = venv.script(f"extra_{extra}.py", code)
    assert done.returncode == 0, done.stderr
    assert done.stdout == expected
