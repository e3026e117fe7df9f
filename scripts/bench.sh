#!/usr/bin/env bash
# One benchmark run, set up the way docs/benchmarks.md prescribes.
#
#   scripts/bench.sh ingest --connections 2000 --window 1 --rest-workers 0 --duration 15s
#   scripts/bench.sh fanout --rooms 200 --members 50 --senders 200 --rate 1500 --duration 15s
#   PODS=2 scripts/bench.sh fanout --rooms 2 --members 1000 --senders 4 --rate 100 --duration 15s
#   scripts/bench.sh idle --connections 19000 --hold 10s
#
# The --pid of each pod is added: chat-bench reports the pods' RSS (idle) or
# their CPU over each measured phase (fanout, ingest).
#
# Everything after the script's name goes to `chat-bench` (its scenarios and
# options: `target/release/chat-bench --help`). Each run:
#   1. builds the release binaries;
#   2. in cluster mode (the default), creates an empty database and uses a
#      Redis key prefix of its own (both removed afterwards) on the
#      PostgreSQL and Redis that scripts/services.sh finds or starts;
#   3. starts PODS servers (ports 8001, 8002, ...) with the protective limits
#      raised, pinned to SERVER_CPUS, and waits until they are ready;
#   4. pins the generator, and PostgreSQL and Redis when they run on this
#      machine, to LOAD_CPUS (their affinity is reset to every core at exit);
#   5. runs chat-bench: its JSON line goes to stdout, its summary to stderr,
#      followed by each core's busy share and each process group's CPU over
#      the run (so a reader can tell who was saturated). chat-bench also
#      reports PostgreSQL's and Redis's CPU over each measured phase when
#      they run here, and for ingest what an acked message cost each process
#      (`cpu_us_per_acked`).
#
# Settings (environment):
#   MODE         cluster (PostgreSQL + Redis, default) or embedded (SQLite)
#   PODS         servers to start (default 1); connections are spread over them
#   SERVER_CPUS  taskset CPU list for the servers (default 0)
#   LOAD_CPUS    taskset CPU list for the generator, PostgreSQL and Redis
#                (default: every CPU but SERVER_CPUS's first, or 0 on one CPU)
#   RUST_LOG     the servers' log filter (default warn, as in the docs' figures)
#   KEEP_LOGS    set to keep the servers' logs (their directory is printed)
#   KEEP_DATA    set to keep the run's database and Redis keys (cluster mode;
#                named at exit): to look up what a run stored, e.g. the
#                sends an ingest run reports as `unanswered`. A throwaway
#                PostgreSQL or Redis the script started is stopped all the same.
#   BIN_DIR      run the chat-service and chat-bench found there instead of
#                building this checkout (to compare two builds)
#   HALT_POLL_NS on a KVM guest whose idle driver is haltpoll: how long an
#                idle vCPU polls for work before it halts, for this run
#                (root; the setting is put back at exit). Unset: as the
#                machine has it. See docs/benchmarks.md, twenty-second VM.
set -euo pipefail
cd "$(dirname "$0")/.."

[[ $# -ge 1 ]] || {
    # The comment block at the top, all of it.
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
    exit 2
}

MODE=${MODE:-cluster}
PODS=${PODS:-1}
SERVER_CPUS=${SERVER_CPUS:-0}
CPUS=$(nproc)
if [[ -z ${LOAD_CPUS:-} ]]; then
    if ((CPUS > 1)); then
        first=${SERVER_CPUS%%[,-]*}
        LOAD_CPUS=$(seq 0 $((CPUS - 1)) | grep -vx "$first" | paste -sd,)
    else
        LOAD_CPUS=0
    fi
fi
export RUST_LOG=${RUST_LOG:-warn}
SECRET=bench-secret-bench-secret-bench-secret-0123456789
RUN=bench_$(date +%s)_$$
WORK=$(mktemp -d)
PIDS=()

say() { printf 'bench: %s\n' "$*" >&2; }

if [[ -n ${BIN_DIR:-} ]]; then
    BIN=$(cd "$BIN_DIR" && pwd) # another build's chat-service and chat-bench, for A/B runs
else
    cargo build --release --locked --bins >&2
    BIN=$PWD/target/release
fi

# Descriptors for 19,000 connections on each side.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

server_env=(
    JWT_SECRET=$SECRET
    SEND_RATE_LIMIT=100000000 CONNECT_RATE_LIMIT=100000000
    REST_RATE_LIMIT=100000000 FRAME_FLOOD_LIMIT=100000000
)
local_pids=()
if [[ $MODE == cluster ]]; then
    # shellcheck source=scripts/services.sh
    source scripts/services.sh
    psql=$(_chat_svc_psql)
    "$psql" -q -d "$CHAT_TEST_DATABASE_URL" -c "CREATE DATABASE $RUN"
    database_url=${CHAT_TEST_DATABASE_URL%/*}/$RUN
    server_env+=(DATABASE_URL="$database_url" REDIS_URL="$CHAT_TEST_REDIS_URL" REDIS_KEY_PREFIX="$RUN:")
    # PostgreSQL and Redis on this machine move to the load's CPUs, so the
    # servers have theirs to themselves as they would beside remote ones.
    mapfile -t local_pids < <(pgrep -x postgres; pgrep -x redis-server)
elif [[ $MODE == embedded ]]; then
    server_env+=(DATABASE_URL="sqlite://$WORK/chat.db")
else
    say "MODE must be cluster or embedded, not $MODE"
    exit 2
fi

finish() {
    local status=$?
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    for pid in "${local_pids[@]}"; do taskset -a -cp "0-$((CPUS - 1))" "$pid" >/dev/null 2>&1 || true; done
    if [[ $MODE == cluster && -n ${KEEP_DATA:-} ]]; then
        say "kept: database $RUN, Redis keys $RUN:*"
    elif [[ $MODE == cluster ]]; then
        "$psql" -q -d "$CHAT_TEST_DATABASE_URL" -c "DROP DATABASE IF EXISTS $RUN" || true
        if command -v redis-cli >/dev/null; then
            redis-cli -u "$CHAT_TEST_REDIS_URL" --scan --pattern "$RUN:*" |
                xargs -r -n 500 redis-cli -u "$CHAT_TEST_REDIS_URL" del >/dev/null || true
        fi
    fi
    # Our trap replaced the one services.sh set for throwaway servers.
    if declare -F chat_services_stop >/dev/null; then chat_services_stop; fi
    if [[ -n ${halt_poll_was:-} ]]; then echo "$halt_poll_was" >"$HALT_POLL"; fi
    if [[ -n ${KEEP_LOGS:-} ]]; then say "server logs in $WORK"; else rm -rf "$WORK"; fi
    exit "$status"
}
trap finish EXIT

HALT_POLL=/sys/module/haltpoll/parameters/guest_halt_poll_ns
if [[ -n ${HALT_POLL_NS:-} ]]; then
    [[ -w $HALT_POLL ]] || {
        say "HALT_POLL_NS needs a KVM guest with the haltpoll idle driver, and root ($HALT_POLL)"
        exit 2
    }
    halt_poll_was=$(<"$HALT_POLL")
    echo "$HALT_POLL_NS" >"$HALT_POLL"
fi

for pid in "${local_pids[@]}"; do taskset -a -cp "$LOAD_CPUS" "$pid" >/dev/null 2>&1 || true; done

urls=()
pid_args=()
for ((i = 1; i <= PODS; i++)); do
    port=$((8000 + i))
    env "${server_env[@]}" taskset -c "$SERVER_CPUS" "$BIN/chat-service" serve \
        --listen "127.0.0.1:$port" >"$WORK/pod$i.log" 2>&1 &
    PIDS+=($!)
    urls+=("http://127.0.0.1:$port")
    pid_args+=(--pid "$!")
done
for url in "${urls[@]}"; do
    for _ in $(seq 100); do
        curl -fs -o /dev/null "$url/readyz" && continue 2
        sleep 0.1
    done
    say "$url did not become ready; its log:"
    cat "$WORK"/pod*.log >&2
    exit 1
done

# Per CPU: busy ticks, ticks stolen by the hypervisor, all ticks; and CPU
# ticks of a set of processes (threads included).
cpu_ticks() { awk '/^cpu[0-9]/ { print $1, $2 + $3 + $4 + $7 + $8, $9, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9 }' /proc/stat; }
proc_ticks() {
    local total=0 pid
    for pid in "$@"; do
        total=$((total + $(awk '{ print $14 + $15 }' "/proc/$pid/stat" 2>/dev/null || echo 0)))
    done
    echo "$total"
}
# The pods' ticks are read before they stop, so only live processes count.
group_ticks() {
    echo "servers $(proc_ticks "${PIDS[@]}")"
    echo "postgres $(proc_ticks $(pgrep -x postgres))"
    echo "redis $(proc_ticks $(pgrep -x redis-server))"
}

# Each pod's PID: chat-bench reports their RSS (idle) or their CPU over each
# measured phase (fanout, ingest).
extra=("${pid_args[@]}")
# PostgreSQL and Redis on this machine too, for each phase's CPU and (ingest)
# each one's CPU per acked message; an older chat-bench (BIN_DIR) lacks the
# option.
if ((${#local_pids[@]})) && [[ $("$BIN/chat-bench" --help) == *--watch* ]]; then
    extra+=(--watch postgres --watch redis-server)
fi
polling=""
[[ -r $HALT_POLL ]] && polling=", guest halt polling $(<"$HALT_POLL") ns"
say "$PODS pod(s) on CPU $SERVER_CPUS, load on CPU $LOAD_CPUS, mode $MODE, RUST_LOG=$RUST_LOG$polling"
cpu_before=$(cpu_ticks)
groups_before=$(group_ticks)
started=$EPOCHREALTIME
JWT_SECRET=$SECRET taskset -c "$LOAD_CPUS" "$BIN/chat-bench" \
    --url "$(IFS=,; echo "${urls[*]}")" "$@" "${extra[@]}"
elapsed=$(awk -v a="$started" -v b="$EPOCHREALTIME" 'BEGIN { print b - a }')
cpu_after=$(cpu_ticks)
groups_after=$(group_ticks)
hz=$(getconf CLK_TCK)

{
    # A share stolen by the hypervisor slows every process for no reason
    # any of them shows: such a run is not comparable with a quiet one.
    printf 'cores busy over the run (and stolen from this VM):'
    paste -d' ' <(echo "$cpu_before") <(echo "$cpu_after") |
        awk '{ t = $8 - $4; printf " %s %d%% (%d%%)", $1, 100 * ($6 - $2) / t, 100 * ($7 - $3) / t }'
    printf '\nCPU over the run, %% of one core:'
    paste -d' ' <(echo "$groups_before") <(echo "$groups_after") |
        awk -v hz="$hz" -v t="$elapsed" '{ printf " %s %d%%", $1, 100 * ($4 - $2) / hz / t }'
    printf ' (generator: see its report)\n'
} >&2
