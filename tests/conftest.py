"""Shared test configuration: integration tests need the real servers, never a skip."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration" in str(item.path) or "tests/chaos" in str(item.path):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(autouse=True)
def _gc_restored() -> Iterator[None]:
    """A CLI test that runs a worker in this process tunes the collector for the whole
    process (outbox.gctune): each test starts from the interpreter's settings."""
    threshold = gc.get_threshold()
    yield
    if gc.get_freeze_count():
        gc.unfreeze()
    gc.set_threshold(*threshold)
