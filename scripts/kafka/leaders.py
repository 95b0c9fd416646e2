"""Partition leadership of the local Kafka cluster, for `scripts/stack --cluster`.

    leaders.py BOOTSTRAP most          the node id leading the most partitions
    leaders.py BOOTSTRAP under         how many partitions have fewer in-sync replicas
                                       than replicas, or no leader

Run with the project's virtualenv (kafka-python). Exit 1 with one line on stderr when
the cluster cannot be asked.
"""

from __future__ import annotations

import logging
import sys
from collections import Counter

from kafka.admin import KafkaAdminClient


def main() -> int:
    logging.disable(logging.CRITICAL)  # the client's own warnings would drown the answer
    bootstrap, what = sys.argv[1], sys.argv[2]
    try:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
        try:
            topics = admin.describe_topics()
        finally:
            admin.close()
    except Exception as exc:  # one line for the shell script, no traceback
        print(f"leaders: cannot describe the cluster: {type(exc).__name__}: {exc}",
              file=sys.stderr)
        return 1
    partitions = [p for t in topics for p in t["partitions"]]
    if what == "most":
        led = Counter(p["leader_id"] for p in partitions if p["leader_id"] >= 0)
        if not led:
            print("leaders: no partition has a leader", file=sys.stderr)
            return 1
        print(led.most_common(1)[0][0])
    elif what == "under":
        print(sum(1 for p in partitions
                  if p["leader_id"] < 0 or len(p["isr_nodes"]) < len(p["replica_nodes"])))
    else:
        print(f"leaders: unknown question {what!r} (most|under)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
