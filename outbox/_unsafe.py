"""Switches that turn a safety mechanism off, for fault-injection tests only.

`OUTBOX_UNSAFE_DISABLE=ordering,ack,dedupe,shards,progress` (or `disable()` in a test) removes
the named mechanism so the test suite and the chaos checker can show that each one is
needed. Never set it in production: the names say what you lose.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

MECHANISMS = frozenset({"ordering", "ack", "dedupe", "shards", "progress"})
_overrides: set[str] = set()


def disabled(name: str) -> bool:
    if name in _overrides:
        return True
    env = os.environ.get("OUTBOX_UNSAFE_DISABLE", "")
    return bool(env) and name in {part.strip() for part in env.split(",")}


@contextmanager
def disable(name: str) -> Iterator[None]:
    """Turn one mechanism off inside a `with` block (tests only)."""
    if name not in MECHANISMS:
        raise ValueError(f"unknown safety mechanism {name!r}; known: {sorted(MECHANISMS)}")
    _overrides.add(name)
    try:
        yield
    finally:
        _overrides.discard(name)
