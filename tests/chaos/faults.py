"""The chaos run's processes and faults.

Random faults (kills, pauses, broker and database restarts, network cuts) hit the crash
windows of the design only by luck. The `window_*` kinds hit them on purpose, each
aimed at the window one safety mechanism closes, so removing that mechanism
(`OUTBOX_UNSAFE_DISABLE`) is caught in every run, not in some:

  window_send_crash    a relay dies right after handing a batch to the producer, before
                       any of it left the process (crash point relay.after_send, a long
                       linger): without `ack`, the batch was deleted already and is lost.
  window_inflight_kill a relay is killed while Kafka has not received its Produce request
                       (held in the proxy, then dropped): without `ack`, lost.
  window_ack_crash     a relay dies after Kafka's ack, before the delete (relay.after_ack):
                       the batch is sent again; without `dedupe`, applied twice.
  window_commit_crash  a consumer dies after its database commit, before the offset commit
                       (consumer.after_commit): redelivered; without `dedupe`, applied twice.
  window_inflight_stall a relay is stopped with a Produce request in flight (held, then
                       dropped) for longer than its lease while the others go on, then
                       resumed: without `shards` (relays sharing rows through SKIP LOCKED)
                       its events reach Kafka after later events of the same keys.
  window_order_race    two transactions on one key, the first to publish commits last, with
                       the relays held back until both committed: without `ordering`
                       (an event's place fixed at publish(), not at commit), out of order.

So that some relay has a send to hold, the in-flight faults commit an event on each of 16
keys as the hold begins (checked like every other event).

A window fault takes its turn (one at a time: they would spoil each other's aim): new
broker kills and database restarts wait until the servers it needs are up (one in
progress ends with its server back), then no new random fault starts while it aims. The
aiming is short and bounded; the rest (restarting the crashed process, the stalled
relay's sleep) overlaps everything else. Random faults overlap each other freely. A
fault counts only when it hit its window (the crash point was reached, a send was in
flight, both transactions committed); a window fault that misses aims again, up to 3
times.
"""

from __future__ import annotations

import contextlib
import random
import signal
import subprocess
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from outbox import Outbox, _unsafe
from outbox._faults import EXIT_CODE as CRASH_EXIT
from tests.chaos.app import bump, probe, race, record
from tests.chaos.proxy import (
    KAFKA_ADD_PARTITIONS_TO_TXN,
    KAFKA_END_TXN,
    KAFKA_PRODUCE,
    ProxyGroup,
    TcpProxy,
    port_owners,
)

ROOT = Path(__file__).resolve().parents[2]
STACK = str(ROOT / "scripts" / "stack")
LEASE = 3  # the relays' --lease

RANDOM_KINDS = ("relay_kill", "consumer_kill", "relay_pause", "kafka_kill", "pg_restart",
                "net_cut", "net_blackhole", "net_latency")
WINDOW_KINDS = ("window_send_crash", "window_inflight_kill", "window_ack_crash",
                "window_commit_crash", "window_inflight_stall", "window_order_race")
KINDS = RANDOM_KINDS + WINDOW_KINDS
# On the cluster (scripts/stack --cluster): the broker that leads the most partitions is
# killed instead of the only one, and brokers restart one by one, are cut off from
# clients, and the PostgreSQL primary is killed and replaced by its standby.
CLUSTER_RANDOM_KINDS = ("relay_kill", "consumer_kill", "relay_pause", "kafka_leader_kill",
                        "kafka_rolling_restart", "broker_isolate", "pg_failover",
                        "pg_restart", "net_cut", "net_blackhole", "net_latency")
CLUSTER_KINDS = CLUSTER_RANDOM_KINDS + WINDOW_KINDS
# Their floors per 600 s (issue 14's targets; the others keep the run's floor). A rolling
# restart takes three broker restarts, a failover a promotion and a pg_rewind: fewer.
CLUSTER_FLOORS_PER_10MIN = {"kafka_leader_kill": 30, "kafka_rolling_restart": 10,
                            "pg_failover": 20, "broker_isolate": 30, "pg_restart": 10}
# held back while a window fault waits for them
SERVER_KINDS = ("kafka_kill", "pg_restart", "kafka_leader_kill", "pg_failover")

# Seconds a fault of each kind is expected to take, until the run has measured it.
PRIOR_SECONDS = {
    "relay_kill": 1.5, "consumer_kill": 2.0, "relay_pause": LEASE + 3.0, "kafka_kill": 6.0,
    "pg_restart": 2.0, "net_cut": 1.0, "net_blackhole": 4.0, "net_latency": 4.0,
    "window_send_crash": 5.0, "window_inflight_kill": 2.5, "window_ack_crash": 5.0,
    "window_commit_crash": 6.0, "window_inflight_stall": LEASE + 4.0,
    "window_order_race": 0.5, "kafka_leader_kill": 8.0, "kafka_rolling_restart": 25.0,
    "broker_isolate": 4.0, "pg_failover": 10.0,
}

# How long a window fault may wait for its servers before it gives up (Faults._aim).
AIM_LIMIT = 18.0

# Window faults aim one at a time, each for a few seconds of calm: fewer of them.
WINDOW_PER_10MIN = 5  # the floor for each window kind (pro rata, at least 1 per run)
WINDOW_NOMINAL_PER_10MIN = 6

# The armed relay of window_send_crash keeps its first batch in the producer (linger)
# until the crash point ends the process: none of it can have reached Kafka. The
# exactly-once relay's linger must stay under its transaction timeout, the lease.
HOLD_IN_PRODUCER = ["--linger-ms", "5000", "--delivery-timeout-ms", "40000"]
HOLD_IN_TXN_PRODUCER = ["--linger-ms", str(LEASE * 1000 - 500),
                        "--delivery-timeout-ms", "40000"]


class Gate:
    """Who may start now. One window fault at a time has its turn: it waits for the servers
    it needs, holding back new server faults (broker kill, database restart) only if they
    keep it waiting; then, while it aims, every new random fault waits. Random faults
    otherwise run together."""

    FREE, SERVERS_HELD, ALL_HELD = 0, 1, 2

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._turn = False
        self._level = self.FREE
        self.servers_faulted = 0  # server faults under way (they end with the server back)
        self.on_aim: Callable[[], None] = lambda: None

    @contextlib.contextmanager
    def random_fault(self, server: bool) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: self._level == self.FREE or (
                self._level == self.SERVERS_HELD and not server))
            self.servers_faulted += server
        try:
            yield
        finally:
            with self._cond:
                self.servers_faulted -= server

    @contextlib.contextmanager
    def turn(self) -> Iterator[Callable[[int], None]]:
        """A window fault's turn; it calls the function it gets with SERVERS_HELD or
        ALL_HELD to hold back more."""
        with self._cond:
            self._cond.wait_for(lambda: not self._turn)
            self._turn = True
        try:
            yield self._hold
        finally:
            with self._cond:
                self._turn, self._level = False, self.FREE
                self._cond.notify_all()

    def _hold(self, level: int) -> None:
        with self._cond:
            self._level = level
        if level == self.ALL_HELD:
            self.on_aim()


class Proc:
    """A child process we can kill, pause and restart; its output goes to a log file.

    `lock` is held by whoever acts on the process (a fault, the supervisor)."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], logs: Path) -> None:
        self.name, self.argv, self.env = name, argv, env
        self.log = logs / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.lock = threading.RLock()
        self.start()

    def start(self, env: dict[str, str] | None = None, args: list[str] | None = None) -> None:
        """Start it, with `env` added to its environment and `args` to its command line."""
        with open(self.log, "ab") as out:
            if env or args:
                out.write(f"--- chaos: started with {env or {}} {args or []}\n".encode())
                out.flush()
            self.proc = subprocess.Popen([*self.argv, *(args or [])], stdout=out,
                                         stderr=subprocess.STDOUT,
                                         env={**self.env, **(env or {})}, cwd=ROOT)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc and self.proc.poll() is None else None

    def exit_code(self) -> int | None:
        """The exit code once it has exited; None while it runs (or never started)."""
        return self.proc.poll() if self.proc else None

    def signal(self, sig: int) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait_exit(self, timeout: float) -> int | None:
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.wait_exit(10)

    def stop(self, timeout: float) -> None:
        """SIGTERM, then SIGKILL if it has not exited within `timeout`."""
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        if self.wait_exit(timeout) is None:
            self.kill()

    def kill_and_restart(self, down: float) -> None:
        with self.lock:
            self.kill()
            time.sleep(down)
            self.start()

    def pause(self, seconds: float) -> None:
        with self.lock:
            self.signal(signal.SIGSTOP)
            time.sleep(seconds)
            self.signal(signal.SIGCONT)

    def ensure_running(self) -> None:
        with self.lock:
            self.signal(signal.SIGCONT)
            if self.proc is None or self.proc.poll() is not None:
                self.start()

    def terminate(self, timeout: float = 40) -> int | None:
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        code = self.wait_exit(timeout)
        if code is None:
            self.kill()
        return code


class Supervisor:
    """Restarts a relay or consumer that exited on its own (nobody holds its lock)."""

    def __init__(self, procs: list[Proc], log: Callable[[str], None]) -> None:
        self.procs, self.log = procs, log
        self.exits: dict[str, list[int]] = defaultdict(list)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="supervisor")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            for p in self.procs:
                if not p.lock.acquire(blocking=False):
                    continue
                try:
                    code = p.exit_code()
                    if code is not None:
                        self.exits[p.name].append(code)
                        self.log(f"  {p.name} exited on its own (code {code}); restarted")
                        p.start()
                finally:
                    p.lock.release()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def stack(*args: str, cluster: bool = False) -> str:
    """Run scripts/stack (with --cluster: the cluster's commands); its standard output."""
    done = subprocess.run([STACK, *(["--cluster"] if cluster else []), *args], timeout=180,
                          capture_output=True, text=True)
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise subprocess.CalledProcessError(done.returncode, f"stack {' '.join(args)}: {last}")
    return done.stdout


class Faults:
    """Every kind of fault, injected on demand: `inject(kind, rng)` -> (hit, detail)."""

    def __init__(self, *, relays: list[Proc], consumers: list[Proc],
                 kafka_proxy: TcpProxy | ProxyGroup, pg_proxy: TcpProxy | ProxyGroup,
                 factory: sessionmaker[Session], topic: str,
                 unsafe: str | None, stop: threading.Event, trace: Path,
                 exactly_once: bool = False, broker_proxies: list[TcpProxy] | None = None,
                 probe_factory: sessionmaker[Session] | None = None) -> None:
        self.relays, self.consumers = relays, consumers
        # On the cluster: one proxy per broker, and sessions for measuring failovers
        # (a new connection each, to whichever server is the primary).
        self.cluster = broker_proxies is not None
        self.broker_proxies = broker_proxies or []
        self.probe_factory = probe_factory
        self.failovers: list[dict[str, float]] = []
        self._measuring: list[threading.Thread] = []  # failover costs still measured
        self.unpublished_failovers: list[str] = []  # probes not published within 150 s
        # A leader kill (kill, then start) and a rolling restart one at a time: a rolling
        # restart begun between a kill and its start waits for full ISRs that only the
        # start can give, while the start waits for the stack's lock the restart holds.
        self.brokers_lock = threading.Lock()
        self.exactly_once = exactly_once
        # The requests that mean "a send in flight". A transactional relay first adds the
        # partitions to its transaction, then produces, then ends the transaction: a
        # relay held at any of the three has records handed over and no commit answered.
        self.in_flight_keys = {KAFKA_PRODUCE} | (
            {KAFKA_ADD_PARTITIONS_TO_TXN, KAFKA_END_TXN} if exactly_once else set())
        # While aiming at a send in flight, other requests held this long are let through
        # for that long. A transactional relay that took shards over first initializes a
        # producer per shard (FindCoordinator, InitProducerId, retried while the previous
        # owner's transaction is aborted): it needs the way open more often, and longer.
        self.let_through = (0.3, 1.0) if exactly_once else (1.0, 0.3)
        self.aim_seconds = 14.0 if exactly_once else 8.0
        self.kafka_proxy: TcpProxy | ProxyGroup = kafka_proxy
        self.pg_proxy: TcpProxy | ProxyGroup = pg_proxy
        self.proxies = [kafka_proxy, pg_proxy]
        self.factory, self.topic, self.unsafe = factory, topic, unsafe
        self.stop = stop  # set when the run ends: waiting faults give up
        self._trace_file = trace  # what each fault did when, for whoever reads a run's logs
        self._trace_lock = threading.Lock()
        self._t0 = time.monotonic()
        self.box = Outbox()
        self.kafka_up = threading.Event()
        self.pg_up = threading.Event()
        self.kafka_up.set()
        self.pg_up.set()
        self._races = 0
        self.gate = Gate()
        self.gate.on_aim = lambda: self.trace("aiming")

    def trace(self, text: str) -> None:
        with self._trace_lock, open(self._trace_file, "a") as f:
            f.write(f"{time.monotonic() - self._t0:7.2f} {threading.current_thread().name}: "
                    f"{text}\n")

    def inject(self, kind: str, rng: random.Random) -> tuple[bool, str]:
        method: Callable[[random.Random], tuple[bool, str]] = getattr(self, kind)
        if kind not in WINDOW_KINDS:
            with self.gate.random_fault(server=kind in SERVER_KINDS):
                self.trace("start")
                hit, detail = method(rng)
                self.trace(f"end {detail}")
                return hit, detail
        details = []
        for _ in range(3):
            self.trace("aim")
            try:
                hit, detail = method(rng)
            except Exception as exc:  # e.g. the database went away under the race
                hit, detail = False, f"failed: {type(exc).__name__}: {exc}".splitlines()[0]
            self.trace(f"{'hit' if hit else 'miss'}: {detail}")
            details.append(detail)
            if hit or self.stop.wait(1.0):
                break
        return hit, "; ".join(details)

    @staticmethod
    @contextlib.contextmanager
    def _free(procs: list[Proc], rng: random.Random) -> Iterator[Proc]:
        """One of `procs` that no other fault acts on (waiting for one if none is free)."""
        order = rng.sample(procs, len(procs))
        chosen = next((p for p in order if p.lock.acquire(blocking=False)), None)
        if chosen is None:
            chosen = order[0]
            chosen.lock.acquire()
        try:
            yield chosen
        finally:
            chosen.lock.release()

    # -- random faults ----------------------------------------------------------------

    def relay_kill(self, rng: random.Random) -> tuple[bool, str]:
        with self._free(self.relays, rng) as p:
            p.kill_and_restart(rng.uniform(0.1, 1.5))
        return True, p.name

    def consumer_kill(self, rng: random.Random) -> tuple[bool, str]:
        with self._free(self.consumers, rng) as p:
            p.kill_and_restart(rng.uniform(0.1, 1.5))
        return True, p.name

    def relay_pause(self, rng: random.Random) -> tuple[bool, str]:
        with self._free(self.relays, rng) as p:
            p.pause(LEASE + rng.uniform(1, 3))
        return True, p.name

    def kafka_kill(self, rng: random.Random) -> tuple[bool, str]:
        """kill -9 the broker, and start it again as soon as it is gone (plus up to 1 s)."""
        self.kafka_up.clear()
        with contextlib.suppress(subprocess.CalledProcessError):
            stack("kafka-kill")  # fails when not running (an earlier start failed)
        time.sleep(rng.uniform(0, 0.5))
        stack("kafka-start")
        self.kafka_up.set()
        return True, ""

    def pg_restart(self, rng: random.Random) -> tuple[bool, str]:
        """PostgreSQL (on the cluster: the primary) restarted with -m immediate."""
        self.pg_up.clear()
        stack("pg-restart", "-m", "immediate", cluster=self.cluster)
        self.pg_up.set()
        return True, ""

    # -- faults of the cluster ----------------------------------------------------------

    def kafka_leader_kill(self, rng: random.Random) -> tuple[bool, str]:
        """kill -9 the broker leading the most partitions; start it again at once (plus up
        to 0.5 s)."""
        with self.brokers_lock:
            return self._kill_leader(rng)

    def _kill_leader(self, rng: random.Random) -> tuple[bool, str]:
        self.kafka_up.clear()
        try:
            node = stack("kafka-kill-leader", cluster=True).split()[-1]
            time.sleep(rng.uniform(0, 0.5))
            stack("kafka-start", node, cluster=True)
        finally:
            self.kafka_up.set()
        return True, f"broker {node}"

    def kafka_rolling_restart(self, rng: random.Random) -> tuple[bool, str]:
        """Brokers 1, 2, 3 stopped (controlled shutdown) and started one at a time, each
        once every partition is fully replicated again. The brokers are taken broker by
        broker, so a leader kill may come between two of them, as it would in production
        (a restart takes about 10 s a broker here, and a whole one held them 35 s)."""
        for node in ("1", "2", "3"):
            with self.brokers_lock:
                stack("kafka-wait-isr", cluster=True)
                stack("kafka-stop", node, cluster=True)
                stack("kafka-start", node, cluster=True)
        with self.brokers_lock:
            stack("kafka-wait-isr", cluster=True)
        return True, ""

    def broker_isolate(self, rng: random.Random) -> tuple[bool, str]:
        """One broker cut off from every client (the brokers still see each other)."""
        proxy = rng.choice(self.broker_proxies)
        return self._for_a_while(proxy, proxy.isolate, rng)

    @staticmethod
    def _for_a_while(proxy: TcpProxy | ProxyGroup, fault: Callable[[float], None],
                     rng: random.Random) -> tuple[bool, str]:
        """`fault(seconds)` on `proxy` for 2-6 s, and wait them out."""
        seconds = rng.uniform(2, 6)
        fault(seconds)
        time.sleep(seconds)
        return True, f"{proxy.name}: {seconds:.1f}s"

    def pg_failover(self, rng: random.Random) -> tuple[bool, str]:
        """kill -9 the primary, promote the standby, rebuild the old primary as standby
        (scripts/stack --cluster pg-failover), measuring what it cost meanwhile. The
        fault ends once the new standby is synchronous and a write committed on the new
        primary; the time until the relays publish again is measured on, in the
        background (join_measurements), so the next faults need not wait for it."""
        self.pg_up.clear()
        failed: list[BaseException] = []
        done = threading.Event()

        def failover() -> None:
            try:
                stack("pg-failover", cluster=True)
            except BaseException as exc:  # re-raised below, in the fault's thread
                failed.append(exc)
            finally:
                done.set()

        try:
            old_port = int(stack("pg-primary", cluster=True).split()[1])
            worker = threading.Thread(target=failover, daemon=True, name="pg-failover")
            worker.start()
            key, last_old, new_at = self._until_new_primary(old_port, done)
            worker.join()
        finally:
            self.pg_up.set()
        if failed:
            raise failed[0]
        measuring = threading.Thread(target=self._until_published, daemon=True,
                                     args=(key, last_old, new_at), name="failover-cost")
        measuring.start()
        self._measuring.append(measuring)
        return True, f"writes refused {new_at - last_old:.1f}s"

    def join_measurements(self, timeout: float = 60.0) -> None:
        """Wait for the failovers' costs still being measured (the run is over)."""
        deadline = time.monotonic() + timeout
        for thread in self._measuring:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _until_new_primary(self, old_port: int,
                           done: threading.Event) -> tuple[str, float, float]:
        """Write a probe event every 50 ms until one commits on the new primary: (its
        key, the time of the last commit on the old primary, the time of the first on
        the new one)."""
        assert self.probe_factory is not None
        self._races += 1
        key = f"failover-{self._races}"
        last_old = time.monotonic()
        deadline = last_old + 150
        while time.monotonic() < deadline:
            try:
                with self.probe_factory() as session, session.begin():
                    port = session.execute(sa.text("SELECT inet_server_port()")).scalar_one()
                    version = bump(session, key)
                    record(session, self.box.publish(
                        session, topic=self.topic, key=key, type="Bumped",
                        payload={"k": key, "v": version, "probe": True}), version)
                if port == old_port:
                    last_old = time.monotonic()
                    if done.is_set():
                        raise RuntimeError("the failover ended with the old primary writing")
                else:
                    return key, last_old, time.monotonic()
            except sa.exc.DBAPIError:
                pass
            time.sleep(0.05)
        raise RuntimeError("no write committed on a new primary within 150 s")

    def _until_published(self, key: str, last_old: float, new_at: float) -> None:
        """Once the relays published the probe written on the new primary, note the
        failover's cost: how long writes were refused, and until the relays published
        again (both from the last commit on the old primary)."""
        assert self.probe_factory is not None
        deadline = new_at + 150
        while time.monotonic() < deadline:
            with contextlib.suppress(sa.exc.DBAPIError), self.probe_factory() as session:
                left = session.execute(sa.text(
                    "SELECT count(*) FROM outbox_events WHERE key = :k"), {"k": key}).scalar_one()
                if left == 0:
                    self.failovers.append({"writes_refused_s": round(new_at - last_old, 2),
                                           "relay_publish_s": round(time.monotonic() - last_old,
                                                                    2)})
                    return
            time.sleep(0.05)
        self.unpublished_failovers.append(key)  # a violation of the run (run.Report)

    def net_cut(self, rng: random.Random) -> tuple[bool, str]:
        proxy = rng.choice(self.proxies)
        n = proxy.cut(refuse_for=rng.uniform(0, 2))
        return True, f"{proxy.name}: {n} connections"

    def net_blackhole(self, rng: random.Random) -> tuple[bool, str]:
        proxy = rng.choice(self.proxies)
        return self._for_a_while(proxy, proxy.blackhole, rng)

    def net_latency(self, rng: random.Random) -> tuple[bool, str]:
        proxy = rng.choice(self.proxies)
        proxy.slow(rng.uniform(0.02, 0.2))
        time.sleep(rng.uniform(2, 6))
        proxy.slow(0.0)
        return True, proxy.name

    # -- faults aimed at the crash windows --------------------------------------------

    def window_send_crash(self, rng: random.Random) -> tuple[bool, str]:
        return self._crash_at(self.relays, rng, "relay.after_send",
                              HOLD_IN_TXN_PRODUCER if self.exactly_once else HOLD_IN_PRODUCER)

    def window_ack_crash(self, rng: random.Random) -> tuple[bool, str]:
        return self._crash_at(self.relays, rng, "relay.after_ack")

    def window_commit_crash(self, rng: random.Random) -> tuple[bool, str]:
        return self._crash_at(self.consumers, rng, "consumer.after_commit")

    def window_inflight_kill(self, rng: random.Random) -> tuple[bool, str]:
        return self._in_flight(rng, stall=False)

    def window_inflight_stall(self, rng: random.Random) -> tuple[bool, str]:
        return self._in_flight(rng, stall=True)

    def window_order_race(self, rng: random.Random) -> tuple[bool, str]:
        self._races += 1
        key = f"race-{self._races}"
        unsafe = _unsafe.disable("ordering") if self.unsafe == "ordering" \
            else contextlib.nullcontext()
        with self._aim(self.pg_up) as ready:
            if not ready:
                return False, "PostgreSQL down"
            self.pg_proxy.hold()  # relays see neither commit until both are done
            try:
                time.sleep(0.1)  # a relay's query already at the server finishes first
                with unsafe:
                    return race(self.factory, self.box, self.topic, key), key
            finally:
                self.pg_proxy.release()

    def _crash_at(self, procs: list[Proc], rng: random.Random, point: str,
                  args: list[str] | None = None, wait: float = 10.0) -> tuple[bool, str]:
        """Restart one of `procs` armed to exit at crash point `point`, wait for that exit,
        restart it unarmed. A hit when it exited there (code 86)."""
        with self._aim(self.kafka_up, self.pg_up) as ready:
            if not ready:
                return False, "servers down"
            with self._free(procs, rng) as p:
                if p in self.relays:
                    p.kill()  # at once; a relay holds nothing a successor must wait for
                else:
                    p.stop(timeout=5)  # a consumer leaves its group: no session to expire
                p.start(env={"OUTBOX_FAULT_CRASH": f"{point}:1"}, args=args)
                deadline = time.monotonic() + wait
                code = p.wait_exit(0.2)
                while code is None and time.monotonic() < deadline and not self.stop.is_set():
                    code = p.wait_exit(0.2)
                if code is None:
                    p.kill()
                p.start()
        return code == CRASH_EXIT, f"{p.name} exit {code}"

    def _in_flight(self, rng: random.Random, stall: bool) -> tuple[bool, str]:
        """Hold the relays' traffic to Kafka until one has a Produce request held; then
        kill it (or stop it), drop every held byte with the connections, and let the
        others go on. The killed relay is restarted; the stopped one resumes after its
        lease has expired, the others having sent its events and later ones meanwhile."""
        proxy = self.kafka_proxy
        with self._aim(self.kafka_up, self.pg_up) as ready:
            if not ready:
                return False, "servers down"
            proxy.hold()
            try:
                # events on 16 keys: every live relay owns one of their shards, so it sends
                probe(self.factory, self.box, self.topic,
                      [f"probe-{i}" for i in range(16)])
                victim, seen = self._relay_with_send_held(rng, timeout=self.aim_seconds)
                if victim is None:
                    return False, f"no free relay had a send in flight ({seen})"
                try:
                    time.sleep(0.5)  # it has deleted (without `ack`), waits for the answer
                    if stall:
                        victim.signal(signal.SIGSTOP)
                    else:
                        victim.kill()
                    dropped = proxy.cut()
                except BaseException:
                    victim.signal(signal.SIGCONT)
                    victim.lock.release()
                    raise
            finally:
                proxy.release()
            if stall:  # the others deliver later events of its keys, undisturbed
                time.sleep(1.5)
        try:
            if stall:
                time.sleep(LEASE + rng.uniform(0, 1.5))
                victim.signal(signal.SIGCONT)
            else:
                time.sleep(rng.uniform(0.1, 1.0))
                victim.start()
        finally:
            victim.lock.release()
        return True, f"{victim.name}, {dropped} connections dropped"

    @contextlib.contextmanager
    def _aim(self, *servers: threading.Event) -> Iterator[bool]:
        """Take a turn, wait until `servers` are up (holding back new server faults after
        8 s), then aim (see Gate). Yields False if that takes over AIM_LIMIT (18 s)."""

        def ready() -> bool:
            return all(s.is_set() for s in servers) and not self.gate.servers_faulted

        def wait(seconds: float) -> bool:
            deadline = time.monotonic() + seconds
            while not ready():
                if self.stop.wait(0.1) or time.monotonic() > deadline:
                    return False
            return True

        with self.gate.turn() as hold:
            if not wait(8.0):
                self.trace("holding back server faults")
                hold(Gate.SERVERS_HELD)
                if not wait(10.0):
                    yield False
                    return
            hold(Gate.ALL_HELD)
            if not wait(10.0):  # a server fault that started just before: let it end
                yield False
                return
            yield True

    def _relay_with_send_held(self, rng: random.Random,
                              timeout: float) -> tuple[Proc | None, str]:
        """A relay with a send held in the Kafka proxy (which the caller holds; a request of
        `in_flight_keys`),
        locked for the caller (no other fault acts on it); None if none shows up in
        `timeout` seconds, with what was seen instead. Other requests held a while
        (clients connecting, fetching metadata) are let through (`let_through`), so a
        relay gets to send."""
        deadline = time.monotonic() + timeout
        seen = "nothing held"
        other_since: float | None = None
        while time.monotonic() < deadline and not self.stop.is_set():
            time.sleep(0.1)
            held = self.kafka_proxy.held_kafka_requests()
            ports = [port for port, keys in held.items() if self.in_flight_keys & set(keys)]
            if not ports:
                keys = sorted({k for ks in held.values() for k in ks})
                seen = f"held requests {keys}, no send"
                if keys and other_since is None:
                    other_since = time.monotonic()
                elif keys and other_since is not None and \
                        time.monotonic() - other_since > self.let_through[0]:
                    self.kafka_proxy.release()  # let them through for a moment
                    time.sleep(self.let_through[1])
                    self.kafka_proxy.hold()
                    other_since = None
                continue
            by_pid = {p.pid: p for p in self.relays if p.pid is not None}
            owners = port_owners(ports, self.kafka_proxy.listen_ports, by_pid)
            names = sorted({by_pid[pid].name for pid in owners.values()})
            seen = f"a send held from {names or 'no relay'}, all busy"
            for name in rng.sample(names, len(names)):
                victim = next(p for p in self.relays if p.name == name)
                if victim.lock.acquire(blocking=False):
                    return victim, ""
        return None, seen
