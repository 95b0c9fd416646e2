"""docker-compose.yml is not run here (no Docker engine); check what can be checked."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_compose_file_is_consistent() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"postgres", "kafka", "migrate", "relay", "demo"} <= set(services)
    for name in ("postgres", "kafka"):
        assert services[name]["healthcheck"]["test"], name
    for name in ("migrate", "relay", "demo"):
        env = services[name]["environment"]
        assert env["OUTBOX_DATABASE_URL"].startswith("postgresql://outbox:outbox@postgres:")
        assert env["OUTBOX_KAFKA_BOOTSTRAP_SERVERS"] == "kafka:29092"
    kafka_env = services["kafka"]["environment"]
    assert "INTERNAL://kafka:29092" in kafka_env["KAFKA_ADVERTISED_LISTENERS"]
    assert services["relay"]["depends_on"]["migrate"]["condition"] == \
        "service_completed_successfully"


def test_dockerfile_copies_what_exists() -> None:
    for line in re.findall(r"^COPY (.+)$", (ROOT / "Dockerfile").read_text(), flags=re.M):
        for path in line.split()[:-1]:  # the last word is the destination
            assert (ROOT / path).exists(), path
