# scripts/stack_cluster.sh: the production-like topology of `scripts/stack --cluster`.
# Sourced by scripts/stack (it uses its helpers); not run on its own.
#
# Kafka: three KRaft nodes, each broker and controller, replication factor 3,
# min.insync.replicas=2, unclean leader election off. PostgreSQL: two Debian clusters
# of the same major version as the single-node stack's, a primary and a streaming
# standby with synchronous commit to it. Own ports, own state in $ROOT/.stack-cluster/;
# the single-node stack (cluster "main", ports 5432, 9092-9095) is never touched.
# shellcheck shell=bash

CSTATE="$ROOT/.stack-cluster"
CK_NODES=(1 2 3)
CK_CLIENT_BASE=19091      # node N: clients on 19091+N
CK_CONTROLLER_BASE=19191  # node N: controller on 19191+N
CK_PROXIED_BASE=19291     # node N: the PROXIED listener on 19291+N ...
CK_PROXY_BASE=19391       # ... advertised as 19391+N, where the chaos harness's proxy listens
# Three JVMs on 2 shared cores: small heaps, SerialGC, C1 only (see KAFKA_JVM_FLAGS).
CK_JVM_FLAGS=(-Xms96m -Xmx384m -XX:+UseSerialGC -XX:TieredStopAtLevel=1
              -XX:-UsePerfData -XX:+IgnoreUnrecognizedVMOptions)
CK_ISR_TIMEOUT=90         # seconds a rolling restart waits for the ISRs to be full again

CPG_NAMES=(outbox_a outbox_b)
CPG_PORTS=(15432 15433)
CPG_READY_TIMEOUT=60
CPG_SYNC_TIMEOUT=90       # seconds for a rebuilt standby to stream and be synchronous

cluster_usage() {
  cat <<EOF
usage: scripts/stack --cluster <command> [options]   (or OUTBOX_STACK_CLUSTER=1)

A three-node Kafka cluster and a PostgreSQL primary with a synchronous standby, on
their own ports; state in $CSTATE (git-ignored).

  up                   create and start whatever is missing; print where
  down                 stop all of it (data is kept; \`up\` starts it again)
  status               each node and server, and who is primary
  env                  export lines with multi-host URLs: eval "\$(scripts/stack --cluster env)"
  kafka-kill N         kill -9 broker N (1-3)
  kafka-stop N         SIGTERM broker N (controlled shutdown) and wait for it to exit
  kafka-start [N]      start broker N (all stopped ones without N) and wait until it serves
  kafka-kill-leader    kill -9 the broker leading the most partitions; prints its id
  kafka-rolling-restart
                       restart brokers 1, 2, 3 one at a time, each after the ISRs are full
  kafka-wait-isr       wait until no partition is under-replicated
  kafka-leader         print the id of the broker leading the most partitions
  pg-failover          kill -9 the primary, promote the standby, rebuild the old primary
                       as the new standby (pg_rewind, else a fresh base backup); returns
                       once the new standby is synchronous again
  pg-rebuild-standby   make the stopped cluster a standby of the running primary again
                       (repairs a failover that stopped half-way)
  pg-restart [-m MODE] restart the primary (default mode: fast)
  pg-primary           print the name and port of the primary
EOF
}

# --- PostgreSQL ------------------------------------------------------------------
# The major version of the single-node stack's cluster (else the newest installed).
cpg_version() {
  local v
  v="$(pg_lsclusters -h 2>/dev/null | awk '$3 == 5432 {print $1; exit}')"
  [[ -n "$v" ]] || v="$(printf '%s\n' /usr/lib/postgresql/*/bin/postgres | sort -V | tail -n1 | cut -d/ -f5)"
  echo "$v"
}

cpg_port() { local i; for i in 0 1; do [[ "${CPG_NAMES[$i]}" == "$1" ]] && echo "${CPG_PORTS[$i]}"; done; }
cpg_other() { [[ "$1" == "${CPG_NAMES[0]}" ]] && echo "${CPG_NAMES[1]}" || echo "${CPG_NAMES[0]}"; }
cpg_data() { echo "/var/lib/postgresql/$CPG_VER/$1"; }
cpg_exists() { pg_lsclusters -h 2>/dev/null | awk -v v="$CPG_VER" -v n="$1" '$1 == v && $2 == n {f=1} END {exit !f}'; }
cpg_online() { pg_lsclusters -h 2>/dev/null | awk -v v="$CPG_VER" -v n="$1" '$1 == v && $2 == n {print $4}' | grep -q '^online'; }
cpg_psql() { local name="$1"; shift; as_postgres psql -qAtX -p "$(cpg_port "$name")" -d postgres -v ON_ERROR_STOP=1 "$@"; }
cpg_bin() { echo "/usr/lib/postgresql/$CPG_VER/bin/$1"; }
cpg_conninfo() { echo "host=127.0.0.1 port=$(cpg_port "$1") user=$PG_USER password=$PG_PASSWORD"; }

cpg_wait_ready() {
  local deadline=$((SECONDS + CPG_READY_TIMEOUT))
  until pg_isready -q -t 2 -h 127.0.0.1 -p "$(cpg_port "$1")"; do
    ((SECONDS < deadline)) || die "PostgreSQL $CPG_VER/$1 does not accept connections after ${CPG_READY_TIMEOUT}s; see /var/log/postgresql/postgresql-$CPG_VER-$1.log"
    sleep 0.1
  done
}

# The online cluster that is not in recovery (nothing if there is none).
cpg_primary() {
  local name
  for name in "${CPG_NAMES[@]}"; do
    if cpg_online "$name" && [[ "$(cpg_psql "$name" -c 'SELECT pg_is_in_recovery()' 2>/dev/null)" == f ]]; then
      echo "$name"; return 0
    fi
  done
  return 1
}

# Settings both clusters need, primary or standby (pg_rewind needs wal_log_hints). They
# live in /etc/postgresql/<ver>/<name>/, never in the data directory, so a rewind or a
# base backup (which copy the data directory) cannot carry one cluster's role to the other.
cpg_configure() {
  local name="$1" kv
  for kv in "max_connections=$PG_MIN_CONNECTIONS" \
            "wal_level=replica" "max_wal_senders=10" "wal_keep_size=1GB" \
            "wal_log_hints=on" "hot_standby=on" "synchronous_commit=on" \
            "wal_retrieve_retry_interval=500ms" "wal_sender_timeout=10s" \
            "wal_receiver_timeout=10s" "shared_buffers=64MB" \
            "synchronous_standby_names="; do
    pg_conftool "$CPG_VER" "$name" set "${kv%%=*}" "${kv#*=}" >&2
  done
}

# synchronous_standby_names on the primary: '*' (any connected standby must have a
# commit before it is acknowledged) or '' (commits do not wait: only while the standby
# is being rebuilt, see pg-failover).
cpg_set_sync() {
  pg_conftool "$CPG_VER" "$1" set synchronous_standby_names "$2" >&2
  if cpg_online "$1"; then pgctl "$CPG_VER" "$1" reload; fi
}

# Wait until PRIMARY streams to a standby (sync: synchronously).
cpg_wait_standby() {
  local primary="$1" want="$2" deadline=$((SECONDS + CPG_SYNC_TIMEOUT)) state
  while :; do
    state="$(cpg_psql "$primary" -c "SELECT sync_state FROM pg_stat_replication WHERE state = 'streaming'" 2>/dev/null || true)"
    [[ -n "$state" && ( "$want" == any || "$state" == *"$want"* ) ]] && return 0
    ((SECONDS < deadline)) || die "no $want standby streams from $primary after ${CPG_SYNC_TIMEOUT}s; see /var/log/postgresql/postgresql-$CPG_VER-*.log"
    sleep 0.2
  done
}

# Make NAME a standby of PRIMARY from scratch: empty its data directory, base backup.
cpg_base_backup() {
  local name="$1" primary="$2" data; data="$(cpg_data "$name")"
  say "base backup of $primary into $name ..."
  as_postgres find "$data" -mindepth 1 -delete
  as_postgres "$(cpg_bin pg_basebackup)" -D "$data" -R -X stream -c fast \
    -d "$(cpg_conninfo "$primary") application_name=$name" >&2
}

cpg_create() {
  local name="$1"
  say "creating PostgreSQL cluster $CPG_VER/$name on port $(cpg_port "$name") ..."
  pg_createcluster "$CPG_VER" "$name" -p "$(cpg_port "$name")" >&2 8>&- 9>&-
  cpg_configure "$name"
}

cpg_start() { cpg_online "$1" || pgctl "$CPG_VER" "$1" start; cpg_wait_ready "$1"; }

cpg_up() {
  pg_install
  CPG_VER="$(cpg_version)"
  local a="${CPG_NAMES[0]}" b="${CPG_NAMES[1]}" primary standby
  if ! cpg_exists "$a" && ! cpg_exists "$b"; then
    cpg_create "$a"
    cpg_start "$a"
    PG_PORT="$(cpg_port "$a")" pg_provision
    cpg_create "$b"
    cpg_base_backup "$b" "$a"
  fi
  cpg_exists "$a" && cpg_exists "$b" || die "only one of $a and $b exists; remove it (pg_dropcluster $CPG_VER NAME) and run up again"
  # The primary is the one without standby.signal; start it first.
  primary='' standby=''
  for name in "$a" "$b"; do
    if as_postgres test -f "$(cpg_data "$name")/standby.signal"; then standby="$name"; else primary="$name"; fi
  done
  [[ -n "$primary" && -n "$standby" ]] || die "$a and $b must be one primary and one standby (standby.signal); repair by hand or drop both clusters"
  cpg_start "$primary"
  cpg_start "$standby"
  cpg_set_sync "$primary" '*'
  cpg_wait_standby "$primary" sync
  PG_PORT="$(cpg_port "$primary")" pg_provision
  echo "postgres: primary $CPG_VER/$primary :$(cpg_port "$primary"), synchronous standby $CPG_VER/$standby :$(cpg_port "$standby")"
}

cpg_down() {
  CPG_VER="$(cpg_version)"
  local name
  for name in "${CPG_NAMES[@]}"; do
    if cpg_exists "$name" && cpg_online "$name"; then say "stopping PostgreSQL $CPG_VER/$name ..."; pgctl "$CPG_VER" "$name" stop; fi
  done
}

cpg_status() {
  CPG_VER="$(cpg_version)"
  local name role
  for name in "${CPG_NAMES[@]}"; do
    if ! cpg_exists "$name"; then echo "postgres: $name not created"; continue; fi
    if ! cpg_online "$name"; then echo "postgres: $CPG_VER/$name stopped, port $(cpg_port "$name")"; continue; fi
    role="$(cpg_psql "$name" -c 'SELECT CASE WHEN pg_is_in_recovery() THEN $$standby$$ ELSE $$primary$$ END' 2>/dev/null || echo '?')"
    if [[ "$role" == primary ]]; then
      role+=" (standbys: $(cpg_psql "$name" -c "SELECT coalesce(string_agg(application_name || ' ' || state || ' ' || sync_state, ', '), 'none') FROM pg_stat_replication" 2>/dev/null))"
    fi
    echo "postgres: $CPG_VER/$name running, port $(cpg_port "$name"), $role"
  done
}

# kill -9 a cluster's postmaster and its children (by pid, from its postmaster.pid).
cpg_kill() {
  local name="$1" pid kids
  pid="$(as_postgres head -n1 "$(cpg_data "$name")/postmaster.pid" 2>/dev/null || true)"
  [[ -n "$pid" ]] && pid_alive "$pid" || die "PostgreSQL $CPG_VER/$name is not running"
  kids="$(ps -o pid= --ppid "$pid" || true)"
  # shellcheck disable=SC2086  # one pid per word
  kill -KILL "$pid" $kids 2>/dev/null || true
  # Until reaped, not only dead: a new postmaster takes a zombie's pid in postmaster.pid
  # for a live server and refuses to start.
  local deadline=$((SECONDS + 10))
  for k in $pid $kids; do
    while [[ -d "/proc/$k" ]] && ((SECONDS < deadline)); do sleep 0.05; done
  done
  wait_port_closed 127.0.0.1 "$(cpg_port "$name")" 10 || say "warning: port $(cpg_port "$name") still open"
}

cpg_failover() {
  CPG_VER="$(cpg_version)"
  local old new t0=$SECONDS
  old="$(cpg_primary)" || die "no PostgreSQL primary is running (scripts/stack --cluster up)"
  new="$(cpg_other "$old")"
  # Only a synchronous standby is sure to have every acknowledged commit.
  [[ "$(cpg_psql "$old" -c "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming' AND sync_state = 'sync'")" -ge 1 ]] \
    || die "the standby $new is not synchronous now; a failover could lose acknowledged commits: refusing"
  cpg_kill "$old"
  say "killed the primary $old (SIGKILL); promoting $new ..."
  # Alone, the new primary must not wait for a standby that is not there yet.
  cpg_set_sync "$new" ''
  pgctl "$CPG_VER" "$new" promote
  until [[ "$(cpg_psql "$new" -c 'SELECT pg_is_in_recovery()' 2>/dev/null)" == f ]]; do
    ((SECONDS - t0 < CPG_READY_TIMEOUT)) || die "$new did not leave recovery"
    sleep 0.1
  done
  # pg_rewind reads the timeline from the source's control file, which a promotion
  # updates only at its next checkpoint (see pg_rewind's documentation).
  cpg_psql "$new" -c CHECKPOINT
  say "$new is the primary ($((SECONDS - t0)) s); rebuilding $old as its standby ..."
  cpg_rebuild "$old" "$new"
  say "failover done in $((SECONDS - t0)) s: primary $new :$(cpg_port "$new"), synchronous standby $old :$(cpg_port "$old")"
}

# Turn the crashed old primary into a standby of the new one: pg_rewind (it first runs
# crash recovery in single-user mode, which needs the Debian config file), else a base
# backup. Synchronous commit is switched back on once it streams.
cpg_rebuild() {
  local old="$1" new="$2" data; data="$(cpg_data "$old")"
  pg_conftool "$CPG_VER" "$old" set synchronous_standby_names '' >&2
  if ! as_postgres "$(cpg_bin pg_rewind)" -D "$data" --source-server="$(cpg_conninfo "$new") dbname=postgres" \
      -R --config-file="/etc/postgresql/$CPG_VER/$old/postgresql.conf" >"$CSTATE/pg_rewind.log" 2>&1; then
    say "pg_rewind failed ($(tail -n1 "$CSTATE/pg_rewind.log")); a fresh base backup instead"
    cpg_base_backup "$old" "$new"
  fi
  as_postgres test -f "$data/standby.signal" || die "$old has no standby.signal after the rebuild"
  if ! (cpg_start "$old"); then
    say "$old does not start as a standby after pg_rewind; a fresh base backup instead"
    cpg_base_backup "$old" "$new"
    cpg_start "$old"
  fi
  cpg_wait_standby "$new" any
  cpg_set_sync "$new" '*'
  cpg_wait_standby "$new" sync
}

cpg_restart() {
  CPG_VER="$(cpg_version)"
  local mode=(-m fast) primary
  while (($#)); do
    case "$1" in
      -m|--mode) [[ $# -ge 2 ]] || die "-m needs smart|fast|immediate"; mode=(-m "$2"); shift 2 ;;
      *) die "unknown option for pg-restart: $1" ;;
    esac
  done
  [[ "${mode[1]}" =~ ^(smart|fast|immediate)$ ]] || die "-m must be smart, fast or immediate (got '${mode[1]}')"
  primary="$(cpg_primary)" || die "no PostgreSQL primary is running (scripts/stack --cluster up)"
  pgctl "${mode[@]}" "$CPG_VER" "$primary" restart
  cpg_wait_ready "$primary"
  say "postgres primary $primary: restarted (${mode[1]})"
}

# --- Kafka -------------------------------------------------------------------------
ck_home() { echo "$CSTATE/kafka/node$1"; }
ck_conf() { echo "$(ck_home "$1")/server.properties"; }
ck_port() { echo $((CK_CLIENT_BASE + $1)); }
ck_bootstrap() { local n out=(); for n in "${CK_NODES[@]}"; do out+=("127.0.0.1:$(ck_port "$n")"); done; (IFS=,; echo "${out[*]}"); }
ck_check_node() { [[ "${1:-}" =~ ^[123]$ ]] || die "name a broker: 1, 2 or 3 (got '${1:-}')"; }

ck_pid() {
  local pid f; f="$(ck_home "$1")/kafka.pid"
  [[ -f "$f" ]] || return 1
  pid="$(cat "$f")"
  pid_alive "$pid" || return 1
  [[ "$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null)" == *"kafka.Kafka $(ck_conf "$1")"* ]] || return 1
  echo "$pid"
}

ck_prepare() {
  KAFKA_HOME="$CSTATE/kafka" KAFKA_LIBS="$CSTATE/kafka/libs" kafka_jars
  local n voters='' cluster_id home
  for n in "${CK_NODES[@]}"; do voters+="${voters:+,}$n@127.0.0.1:$((CK_CONTROLLER_BASE + n))"; done
  if [[ ! -f "$CSTATE/kafka/cluster.id" ]]; then
    KAFKA_LIBS="$CSTATE/kafka/libs" kafka_java kafka.tools.StorageTool random-uuid 2>/dev/null | tail -n1 >"$CSTATE/kafka/cluster.id"
  fi
  cluster_id="$(cat "$CSTATE/kafka/cluster.id")"
  [[ -n "$cluster_id" ]] || die "kafka.tools.StorageTool random-uuid failed"
  for n in "${CK_NODES[@]}"; do
    home="$(ck_home "$n")"
    mkdir -p "$home/data"
    sed -e "s#@NODE_ID@#$n#g" -e "s#@VOTERS@#$voters#g" \
        -e "s#@KAFKA_PORT@#$(ck_port "$n")#g" -e "s#@CONTROLLER_PORT@#$((CK_CONTROLLER_BASE + n))#g" \
        -e "s#@PROXIED_PORT@#$((CK_PROXIED_BASE + n))#g" -e "s#@PROXY_PORT@#$((CK_PROXY_BASE + n))#g" \
        -e "s#@DATA_DIR@#$home/data#g" "$KAFKA_SRC/cluster.properties" >"$(ck_conf "$n")"
    if [[ ! -f "$home/data/meta.properties" ]]; then
      say "formatting Kafka node $n (cluster id $cluster_id) ..."
      KAFKA_LIBS="$CSTATE/kafka/libs" kafka_java -Dlog4j2.configurationFile="$KAFKA_SRC/log4j2.properties" \
        -Dkafka.logs.dir="$home" kafka.tools.StorageTool format -t "$cluster_id" -c "$(ck_conf "$n")" >"$home/format.log" 2>&1 \
        || { cat "$home/format.log" >&2; die "formatting Kafka node $n failed"; }
    fi
  done
}

# Start node N in the background (no wait); remember where its log was.
ck_launch() {
  local n="$1" home pid; home="$(ck_home "$n")"
  ck_pid "$n" >/dev/null && return 0
  wait_port_closed 127.0.0.1 "$(ck_port "$n")" 5 || die "port $(ck_port "$n") is taken by a process we did not start"
  if [[ -f "$home/server.log" ]] && (($(stat -c %s "$home/server.log") > 50 * 1024 * 1024)); then
    mv -f "$home/server.log" "$home/server.log.1"
  fi
  stat -c %s "$home/server.log" 2>/dev/null >"$home/log.offset" || echo 0 >"$home/log.offset"
  setsid java "${CK_JVM_FLAGS[@]}" -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$KAFKA_SRC/log4j2.properties" -Dkafka.logs.dir="$home" \
    -cp "$CSTATE/kafka/libs/*" kafka.Kafka "$(ck_conf "$n")" \
    </dev/null >"$home/stdout.log" 2>&1 8>&- 9>&- &
  pid=$!
  echo "$pid" >"$home/kafka.pid"
}

# Wait until node N logged that it started (since its launch) and its port accepts.
ck_wait() {
  local n="$1" home pid offset deadline=$((SECONDS + KAFKA_START_TIMEOUT)); home="$(ck_home "$n")"
  offset="$(cat "$home/log.offset" 2>/dev/null || echo 0)"
  pid="$(cat "$home/kafka.pid" 2>/dev/null)"
  while :; do
    # pid_alive, not ck_pid: just launched, the process may not have exec'd java yet.
    pid_alive "$pid" || { tail -n 20 "$home/stdout.log" >&2 2>/dev/null; die "Kafka node $n exited during startup; see $home/server.log"; }
    if tail -c +"$((offset + 1))" "$home/server.log" 2>/dev/null | grep -F "[KafkaRaftServer nodeId=$n] Kafka Server started" >/dev/null \
       && tcp_open 127.0.0.1 "$(ck_port "$n")"; then
      return 0
    fi
    ((SECONDS < deadline)) || die "Kafka node $n (pid $pid) did not start within ${KAFKA_START_TIMEOUT}s; see $home/server.log"
    sleep 0.1
  done
}

ck_stop() {  # ck_stop N TERM|KILL
  local n="$1" pid
  pid="$(ck_pid "$n")" || { rm -f "$(ck_home "$n")/kafka.pid"; return 0; }
  if [[ "$2" == KILL ]]; then
    kill -KILL "$pid"
  else
    kill -TERM "$pid"
    local deadline=$((SECONDS + KAFKA_STOP_TIMEOUT))
    while pid_alive "$pid" && ((SECONDS < deadline)); do sleep 0.1; done
    pid_alive "$pid" && { say "Kafka node $n ignored SIGTERM for ${KAFKA_STOP_TIMEOUT}s; SIGKILL"; kill -KILL "$pid"; }
  fi
  while pid_alive "$pid"; do sleep 0.05; done
  wait_port_closed 127.0.0.1 "$(ck_port "$n")" 10 || say "warning: port $(ck_port "$n") still open after node $n exited"
  rm -f "$(ck_home "$n")/kafka.pid"
}

ck_start() {  # ck_start [N]: that node, or every node not running, in parallel
  local nodes=("$@") n
  ((${#nodes[@]})) || nodes=("${CK_NODES[@]}")
  ck_prepare
  for n in "${nodes[@]}"; do ck_launch "$n"; done
  for n in "${nodes[@]}"; do ck_wait "$n"; done
}

ck_python() {
  local py="$ROOT/.venv/bin/python"
  [[ -x "$py" ]] || die "the project's virtualenv is needed to ask Kafka for its leaders (make .venv/.installed)"
  "$py" "$KAFKA_SRC/leaders.py" "$(ck_bootstrap)" "$@"
}

ck_wait_isr() {
  local deadline=$((SECONDS + CK_ISR_TIMEOUT)) under
  while :; do
    under="$(ck_python under 2>/dev/null || echo '?')"
    [[ "$under" == 0 ]] && return 0
    ((SECONDS < deadline)) || die "partitions still under-replicated after ${CK_ISR_TIMEOUT}s ($under)"
    sleep 0.5
  done
}

ck_status() {
  local n pid
  for n in "${CK_NODES[@]}"; do
    if pid="$(ck_pid "$n")"; then
      echo "kafka:    node $n running, pid $pid, client port $(ck_port "$n"), controller $((CK_CONTROLLER_BASE + n))"
    else
      echo "kafka:    node $n stopped"
    fi
  done
}

# --- commands ----------------------------------------------------------------------
cluster_main() {
  local cmd="$1"; shift
  mkdir -p "$CSTATE/kafka"
  # One lock per server kind, as in the single-node stack, in the same order; a
  # failover and a broker fault can overlap, two failovers cannot.
  case "$cmd" in
    up|down|pg-*) exec 8>"$CSTATE/pg.lock"; flock 8 ;;
  esac
  case "$cmd" in
    up|down|kafka-start|kafka-stop|kafka-kill|kafka-kill-leader|kafka-rolling-restart)
      exec 9>"$CSTATE/kafka.lock"; flock 9 ;;
  esac
  local n
  case "$cmd" in
    up)     cpg_up; ck_start; echo "kafka:    3 nodes serving  $(ck_bootstrap)" ;;
    down)   for n in "${CK_NODES[@]}"; do ck_stop "$n" TERM; done; cpg_down ;;
    status) cpg_status; ck_status ;;
    env)
      printf 'export OUTBOX_DATABASE_URL=%q\n' \
        "postgresql+psycopg://$PG_USER:$PG_PASSWORD@/$PG_DB?host=127.0.0.1:${CPG_PORTS[0]}&host=127.0.0.1:${CPG_PORTS[1]}&target_session_attrs=read-write"
      printf 'export OUTBOX_KAFKA_BOOTSTRAP_SERVERS=%q\n' "$(ck_bootstrap)"
      ;;
    kafka-kill)  ck_check_node "${1:-}"; ck_pid "$1" >/dev/null || die "Kafka node $1 is not running"; ck_stop "$1" KILL; say "kafka: node $1 killed (SIGKILL)" ;;
    kafka-stop)  ck_check_node "${1:-}"; ck_stop "$1" TERM; say "kafka: node $1 stopped" ;;
    kafka-start) [[ -z "${1:-}" ]] || ck_check_node "$1"; ck_start "$@"; say "kafka: serving" ;;
    kafka-leader) ck_python most ;;
    kafka-kill-leader)
      n="$(ck_python most)" || die "cannot tell which broker leads the most partitions"
      ck_stop "$n" KILL; say "kafka: node $n (leading the most partitions) killed (SIGKILL)"; echo "$n" ;;
    kafka-wait-isr) ck_wait_isr; say "kafka: every partition fully replicated" ;;
    kafka-rolling-restart)
      for n in "${CK_NODES[@]}"; do
        ck_wait_isr
        ck_stop "$n" TERM; ck_start "$n"; say "kafka: node $n restarted"
      done
      ck_wait_isr ;;
    pg-failover) cpg_failover ;;
    pg-rebuild-standby)
      CPG_VER="$(cpg_version)"
      n="$(cpg_primary)" || die "no PostgreSQL primary is running"
      cpg_online "$(cpg_other "$n")" && die "$(cpg_other "$n") is running; stop it first (pg_ctlcluster $CPG_VER $(cpg_other "$n") stop)"
      cpg_rebuild "$(cpg_other "$n")" "$n" ;;
    pg-restart)  cpg_restart "$@" ;;
    pg-primary)  CPG_VER="$(cpg_version)"; n="$(cpg_primary)" || die "no PostgreSQL primary is running"; echo "$n $(cpg_port "$n")" ;;
    help|-h|--help) cluster_usage ;;
    *) cluster_usage >&2; exit 64 ;;
  esac
}
