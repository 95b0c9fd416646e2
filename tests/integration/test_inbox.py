"""The consumer's dedupe claim on PostgreSQL: one statement that answers which ids of a
batch are new, which were processed before, and what earlier attempts left."""

from __future__ import annotations

import uuid

import sqlalchemy as sa

from outbox.consumer.inbox import PostgresInbox, Prior
from outbox.schema import tables


def test_the_claim_tells_new_from_processed_and_brings_prior_attempts(
        engine: sa.Engine) -> None:
    inbox = PostgresInbox(tables)
    done, failed, fresh = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    with engine.begin() as conn:
        assert inbox.claim(conn, "g", [done]) == {done: None}
        inbox.record_attempt(conn, "g", failed, "ValueError: boom", count=2)
    with engine.begin() as conn:
        got = inbox.claim(conn, "g", [done, failed, fresh, fresh])  # fresh twice
    assert got == {failed: Prior(2, "ValueError: boom"), fresh: None}
    with engine.begin() as conn:  # each group has its own records
        assert inbox.claim(conn, "other", [done, failed]) == {done: None, failed: None}
    with engine.connect() as conn:
        assert inbox.processed(conn, "g", [done, failed, fresh, uuid.uuid4()]) == {
            done, failed, fresh}


def test_a_claim_rolled_back_leaves_the_ids_new(engine: sa.Engine) -> None:
    inbox = PostgresInbox(tables)
    ids = [uuid.uuid4() for _ in range(1000)]
    with engine.connect() as conn, conn.begin() as tx:
        assert set(inbox.claim(conn, "g", ids)) == set(ids)
        tx.rollback()
    with engine.begin() as conn:
        assert set(inbox.claim(conn, "g", ids[:10])) == set(ids[:10])
        assert inbox.claim(conn, "g", ids[:10]) == {}  # now processed, in this transaction
