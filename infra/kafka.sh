#!/usr/bin/env bash
# A private single-node Apache Kafka (KRaft) for development and tests, without Docker.
#
#   infra/kafka.sh fetch              download the broker + CLI jars (Maven Central) once
#   infra/kafka.sh start              start the broker (idempotent) and wait until it answers
#   infra/kafka.sh stop               stop it (SIGTERM, then SIGKILL after KAFKA_STOP_TIMEOUT)
#   infra/kafka.sh status             exit 0 = running and answering, 1 = running but not
#                                     answering, 3 = not running
#   infra/kafka.sh topics ...         org.apache.kafka.tools.TopicCommand (kafka-topics)
#   infra/kafka.sh consumer-groups ...  ConsumerGroupCommand (kafka-consumer-groups)
#
# Everything lives in <repo>/.local/kafka (git-ignored): libs-<version>/, data/,
# server.properties, kafka.pid, server.log.
#
# Environment (all optional):
#   KAFKA_VERSION          3.9.2   (3.9.x speaks the old request versions aiokafka < 0.13 uses)
#   KAFKA_PORT             19092   client listener on 127.0.0.1
#   KAFKA_CONTROLLER_PORT  19093   KRaft controller listener on 127.0.0.1
#   KAFKA_CLUSTER_ID       fixed id used to format the data dir
#   KAFKA_HEAP_OPTS        -Xms256m -Xmx768m
#   KAFKA_JVM_OPTS         extra JVM options for the broker
#   KAFKA_START_TIMEOUT    90      seconds to wait for the broker to answer
#   KAFKA_STOP_TIMEOUT     60      seconds to wait for a clean stop before SIGKILL
#   KAFKA_CDS              1       0 disables the class-data-sharing archive
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
KAFKA_VERSION="${KAFKA_VERSION:-3.9.2}"
KAFKA_PORT="${KAFKA_PORT:-19092}"
KAFKA_CONTROLLER_PORT="${KAFKA_CONTROLLER_PORT:-19093}"
KAFKA_CLUSTER_ID="${KAFKA_CLUSTER_ID:-xJckOdozQFaOu83goDbzFQ}"
KAFKA_HEAP_OPTS="${KAFKA_HEAP_OPTS:--Xms256m -Xmx768m}"
KAFKA_JVM_OPTS="${KAFKA_JVM_OPTS:-}"
KAFKA_START_TIMEOUT="${KAFKA_START_TIMEOUT:-90}"
KAFKA_STOP_TIMEOUT="${KAFKA_STOP_TIMEOUT:-60}"
KAFKA_CDS="${KAFKA_CDS:-1}"

HOST=127.0.0.1
NODE_ID=1
LOCAL="$ROOT/.local/kafka"
LIBS="$LOCAL/libs-$KAFKA_VERSION"
DATA="$LOCAL/data"
PROPS="$LOCAL/server.properties"
PIDFILE="$LOCAL/kafka.pid"
LOG="$LOCAL/server.log"
POM="$ROOT/infra/kafka/pom.xml"
CDS_ARCHIVE="$LOCAL/kafka-$KAFKA_VERSION.jsa"
REQUIRED_JARS=(kafka_2.13 kafka-server kafka-raft kafka-metadata kafka-storage kafka-tools
               scala-library reload4j slf4j-reload4j)

log() { printf 'kafka: %s\n' "$*" >&2; }
die() { printf 'kafka: ERROR: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------- jars

jars_complete() {
    local dir=$1 name
    [[ -f "$dir/.complete" ]] || return 1
    for name in "${REQUIRED_JARS[@]}"; do
        compgen -G "$dir/$name-[0-9]*.jar" >/dev/null || return 1
    done
}

ensure_java_maven() {
    local missing=()
    command -v java >/dev/null 2>&1 || missing+=(default-jre-headless)
    command -v mvn >/dev/null 2>&1 || missing+=(maven)
    ((${#missing[@]} == 0)) && return 0
    if command -v apt-get >/dev/null 2>&1 && ((EUID == 0)); then
        log "installing ${missing[*]} with apt-get"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" </dev/null
    else
        die "java and maven are needed (missing: ${missing[*]}); install them and retry"
    fi
}

cmd_fetch() {
    mkdir -p "$LOCAL"
    jars_complete "$LIBS" && return 0
    ensure_java_maven
    exec 8>"$LOCAL/.fetch.lock"
    flock -w 900 8 || die "another fetch holds $LOCAL/.fetch.lock"
    jars_complete "$LIBS" && return 0      # fetched by whoever held the lock
    local tmp="$LIBS.tmp.$$" started=$SECONDS
    rm -rf "$tmp"
    log "fetching Kafka $KAFKA_VERSION jars from Maven Central (cached in ~/.m2)"
    if ! mvn -q -B -f "$POM" \
        org.apache.maven.plugins:maven-dependency-plugin:3.6.1:copy-dependencies \
        -DoutputDirectory="$tmp" -DincludeScope=runtime -Dkafka.version="$KAFKA_VERSION" \
        </dev/null >"$LOCAL/fetch.log" 2>&1; then
        cat "$LOCAL/fetch.log" >&2
        rm -rf "$tmp"
        die "maven could not fetch kafka_2.13:$KAFKA_VERSION (no such version, or Maven Central unreachable; see above)"
    fi
    touch "$tmp/.complete"
    jars_complete "$tmp" || { rm -rf "$tmp"; die "fetched jars are incomplete: need ${REQUIRED_JARS[*]}"; }
    rm -rf "$LIBS"
    mv "$tmp" "$LIBS"
    exec 8>&-
    log "$(find "$LIBS" -name '*.jar' | wc -l) jars, $(du -sh "$LIBS" | cut -f1) in ${LIBS#"$ROOT"/} ($((SECONDS - started)) s)"
}

need_jars() {
    jars_complete "$LIBS" || cmd_fetch
    command -v java >/dev/null 2>&1 || die "java not found"
}

# ---------------------------------------------------------------- process helpers

# The pid from the pid file, if that process is alive and is our broker.
our_pid() {
    local pid cmdline
    [[ -f "$PIDFILE" ]] || return 1
    pid=$(<"$PIDFILE")
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    [[ -r "/proc/$pid/cmdline" ]] || return 1
    cmdline=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
    [[ "$cmdline" == *"kafka.Kafka $PROPS"* ]] || return 1
    printf '%s\n' "$pid"
}

port_open() {  # something accepts TCP connections on 127.0.0.1:$1
    # shellcheck disable=SC2016  # $0 and $1 expand in the inner bash
    timeout 2 bash -c 'exec 3<>"/dev/tcp/$0/$1"' "$HOST" "$1" 2>/dev/null
}

# A Metadata (v4) request answered with our node among the live brokers: the broker is
# registered, unfenced and serving. Python's standard library is enough; without python3
# fall back to `TopicCommand --list` (slower: a JVM start).
broker_ready() {
    if command -v python3 >/dev/null 2>&1; then
        python3 - "$HOST" "$KAFKA_PORT" "$NODE_ID" <<'PY'
import socket, struct, sys

host, port, node = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
client = b"bizcenter-probe"
# header v1: api_key=3 (Metadata), api_version=4, correlation_id=7, client_id
# body v4: topics=[] (none), allow_auto_topic_creation=false
req = struct.pack(">hhih", 3, 4, 7, len(client)) + client + struct.pack(">ib", 0, 0)
try:
    with socket.create_connection((host, port), timeout=3) as s:
        s.settimeout(3)
        s.sendall(struct.pack(">i", len(req)) + req)

        def read(n: int) -> bytes:
            buf = b""
            while len(buf) < n:
                chunk = s.recv(n - len(buf))
                if not chunk:
                    raise EOFError
                buf += chunk
            return buf

        (size,) = struct.unpack(">i", read(4))
        data = read(size)
    corr, _throttle, count = struct.unpack_from(">iii", data, 0)
    off, nodes = 12, []
    for _ in range(count):
        (nid,) = struct.unpack_from(">i", data, off)
        (hlen,) = struct.unpack_from(">h", data, off + 4)
        off += 4 + 2 + hlen + 4
        (rlen,) = struct.unpack_from(">h", data, off)
        off += 2 + max(rlen, 0)
        nodes.append(nid)
    sys.exit(0 if corr == 7 and node in nodes else 1)
except Exception:
    sys.exit(1)
PY
    else
        run_tool org.apache.kafka.tools.TopicCommand \
            --bootstrap-server "$HOST:$KAFKA_PORT" --list >/dev/null 2>&1
    fi
}

tail_log() {
    if [[ -f "$LOG" ]]; then
        printf -- '--- last lines of %s ---\n' "$LOG" >&2
        tail -n 40 "$LOG" >&2
        printf -- '---\n' >&2
    fi
}

wait_ready() {
    local pid=$1 deadline=$((SECONDS + KAFKA_START_TIMEOUT))
    while ((SECONDS < deadline)); do
        if ! kill -0 "$pid" 2>/dev/null; then
            rm -f "$PIDFILE"
            tail_log
            die "the broker exited during start-up (log: $LOG)"
        fi
        if broker_ready; then
            return 0
        fi
        sleep 0.5
    done
    tail_log
    die "the broker (pid $pid) did not answer on $HOST:$KAFKA_PORT within ${KAFKA_START_TIMEOUT}s" \
        "(raise KAFKA_START_TIMEOUT, or 'infra/kafka.sh stop' and look at $LOG)"
}

# ---------------------------------------------------------------- config

write_config() {
    mkdir -p "$DATA" "$LOCAL/logs"
    cat >"$PROPS.tmp" <<EOF
# Written by infra/kafka.sh on every start; edit the script, not this file.
process.roles=broker,controller
node.id=$NODE_ID
controller.quorum.voters=$NODE_ID@$HOST:$KAFKA_CONTROLLER_PORT
listeners=PLAINTEXT://$HOST:$KAFKA_PORT,CONTROLLER://$HOST:$KAFKA_CONTROLLER_PORT
advertised.listeners=PLAINTEXT://$HOST:$KAFKA_PORT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$DATA

num.partitions=1
default.replication.factor=1
min.insync.replicas=1
auto.create.topics.enable=false
offsets.topic.replication.factor=1
offsets.topic.num.partitions=3
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=3
group.initial.rebalance.delay.ms=0

num.network.threads=2
num.io.threads=2
background.threads=2
num.recovery.threads.per.data.dir=1
# faust changelog topics are compacted: keep the cleaner, shrink its 128 MiB buffer.
log.cleaner.enable=true
log.cleaner.dedupe.buffer.size=8388608
log.cleaner.threads=1
EOF
    mv "$PROPS.tmp" "$PROPS"
    write_log4j
}

write_log4j() {
    mkdir -p "$LOCAL"
    cat >"$LOCAL/log4j.properties" <<'EOF'
log4j.rootLogger=INFO, stdout
log4j.appender.stdout=org.apache.log4j.ConsoleAppender
log4j.appender.stdout.layout=org.apache.log4j.PatternLayout
log4j.appender.stdout.layout.ConversionPattern=[%d] %p %m (%c)%n
log4j.logger.kafka.request.logger=WARN
log4j.logger.kafka.network.RequestChannel$=WARN
log4j.logger.org.apache.kafka.clients=WARN
EOF
    cat >"$LOCAL/tools-log4j.properties" <<'EOF'
log4j.rootLogger=WARN, stderr
log4j.appender.stderr=org.apache.log4j.ConsoleAppender
log4j.appender.stderr.layout=org.apache.log4j.PatternLayout
log4j.appender.stderr.layout.ConversionPattern=[%d] %p %m (%c)%n
log4j.appender.stderr.Target=System.err
EOF
}

format_storage() {
    local out
    if ! out=$(java -Xmx256m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 \
        -Dlog4j.configuration="file:$LOCAL/tools-log4j.properties" \
        -cp "$LIBS/*" kafka.tools.StorageTool format \
        -t "$KAFKA_CLUSTER_ID" -c "$PROPS" --ignore-formatted </dev/null 2>&1); then
        printf '%s\n' "$out" >&2
        die "formatting $DATA failed (a data dir formatted with another cluster id? remove $DATA)"
    fi
}

# ---------------------------------------------------------------- commands

cmd_start() {
    mkdir -p "$LOCAL"
    exec 9>"$LOCAL/.start.lock"
    flock -w $((KAFKA_START_TIMEOUT + 60)) 9 || die "another start holds $LOCAL/.start.lock"

    local pid running_port
    if pid=$(our_pid); then
        running_port=$(sed -n 's|^advertised\.listeners=PLAINTEXT://[^:]*:\([0-9]*\).*|\1|p' "$PROPS")
        if [[ "$running_port" != "$KAFKA_PORT" ]]; then
            die "our broker (pid $pid) already runs on port ${running_port:-?}, not" \
                "KAFKA_PORT=$KAFKA_PORT; run 'infra/kafka.sh stop' first to change ports"
        fi
        if broker_ready; then
            log "already running (pid $pid) on $HOST:$KAFKA_PORT"
            return 0
        fi
        log "running (pid $pid) but not answering yet; waiting"
        wait_ready "$pid"
        log "ready on $HOST:$KAFKA_PORT (pid $pid)"
        return 0
    fi
    rm -f "$PIDFILE"

    if port_open "$KAFKA_PORT"; then
        die "port $KAFKA_PORT on $HOST is taken by another program (not our broker);" \
            "set KAFKA_PORT to a free port"
    fi
    if port_open "$KAFKA_CONTROLLER_PORT"; then
        die "port $KAFKA_CONTROLLER_PORT on $HOST is taken by another program (not our broker);" \
            "set KAFKA_CONTROLLER_PORT to a free port"
    fi

    need_jars
    local started=$SECONDS
    write_config
    format_storage

    # Class-data sharing: the first run records the loaded classes at exit (a clean stop),
    # later runs map them and start faster. A bad or stale archive is ignored by the JVM.
    local cds=()
    if [[ "$KAFKA_CDS" == 1 ]]; then
        if [[ -s "$CDS_ARCHIVE" ]]; then
            cds=(-XX:SharedArchiveFile="$CDS_ARCHIVE" -Xlog:cds=off -Xlog:cds+dynamic=off)
        else
            rm -f "$CDS_ARCHIVE.tmp"
            cds=(-XX:ArchiveClassesAtExit="$CDS_ARCHIVE.tmp" -Xlog:cds=off -Xlog:cds+dynamic=off)
        fi
    fi

    [[ -f "$LOG" ]] && mv -f "$LOG" "$LOG.1"
    local -a heap jvm
    read -r -a heap <<<"$KAFKA_HEAP_OPTS"
    read -r -a jvm <<<"$KAFKA_JVM_OPTS"
    # setsid: own session, so Ctrl-C in the terminal that started it (make run) spares it.
    # 8>&- 9>&-: the broker must not inherit (and hold) our lock files.
    (
        cd "$LOCAL"
        exec setsid nohup java "${heap[@]}" -XX:+UseSerialGC -Djava.awt.headless=true \
            -Dlog4j.configuration="file:$LOCAL/log4j.properties" \
            -Dkafka.logs.dir="$LOCAL/logs" "${cds[@]}" "${jvm[@]}" \
            -cp "$LIBS/*" kafka.Kafka "$PROPS" \
            </dev/null >>"$LOG" 2>&1 8>&- 9>&-
    ) &
    pid=$!
    printf '%s\n' "$pid" >"$PIDFILE"
    log "starting Kafka $KAFKA_VERSION (pid $pid), log ${LOG#"$ROOT"/}"
    wait_ready "$pid"
    log "ready on $HOST:$KAFKA_PORT after $((SECONDS - started)) s"
}

cmd_stop() {
    local pid
    if ! pid=$(our_pid); then
        rm -f "$PIDFILE"
        log "not running"
        return 0
    fi
    log "stopping (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + KAFKA_STOP_TIMEOUT)) killed=0
    while kill -0 "$pid" 2>/dev/null; do
        if ((SECONDS >= deadline)); then
            log "still running after ${KAFKA_STOP_TIMEOUT}s; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            killed=1
            deadline=$((SECONDS + 10))
            while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.2; done
            kill -0 "$pid" 2>/dev/null && die "pid $pid survived SIGKILL"
            break
        fi
        sleep 0.2
    done
    rm -f "$PIDFILE"
    if [[ -s "$CDS_ARCHIVE.tmp" && $killed == 0 ]]; then
        mv -f "$CDS_ARCHIVE.tmp" "$CDS_ARCHIVE"
        log "saved class-data archive for faster starts"
    fi
    rm -f "$CDS_ARCHIVE.tmp"
    log "stopped"
}

cmd_status() {
    local pid
    if ! pid=$(our_pid); then
        echo "kafka: not running"
        return 3
    fi
    if broker_ready; then
        echo "kafka: running (pid $pid), answering on $HOST:$KAFKA_PORT"
        return 0
    fi
    echo "kafka: running (pid $pid), NOT answering on $HOST:$KAFKA_PORT"
    return 1
}

run_tool() {
    local main=$1
    shift
    need_jars
    [[ -f "$LOCAL/tools-log4j.properties" ]] || write_log4j
    java -Xmx512m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -Djava.awt.headless=true \
        -Dlog4j.configuration="file:$LOCAL/tools-log4j.properties" \
        -cp "$LIBS/*" "$main" "$@"
}

usage() {
    sed -n '2,10p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

main() {
    local cmd=${1:-}
    (($#)) && shift
    case "$cmd" in
        fetch) cmd_fetch ;;
        start) cmd_start ;;
        stop) cmd_stop ;;
        status) cmd_status ;;
        topics) run_tool org.apache.kafka.tools.TopicCommand "$@" ;;
        consumer-groups) run_tool org.apache.kafka.tools.consumer.group.ConsumerGroupCommand "$@" ;;
        -h | --help | help) usage ;;
        *) usage >&2; exit 2 ;;
    esac
}

main "$@"
