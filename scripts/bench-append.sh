#!/usr/bin/env bash
# PostgreSQL's cost of one group-commit batch, without the service: pgbench
# calls `chat_append_batch` with 250 new messages (each with a client_id, in
# 250 of 2,000 rooms) in a fresh database, with the store's session settings,
# and this prints the calls per second and the CPU the PostgreSQL server's
# processes used per call (read from /proc, so the server must run on this
# machine; the other load on the machine does not count, as wall time would).
#
#   scripts/bench-append.sh                    # every migration
#   UPTO=0004 scripts/bench-append.sh          # the function as of migration 0004
#   CALLS=1000 taskset -c 1 scripts/bench-append.sh
#
# Settings (environment): CALLS (default 500) measured calls, after 20 to
# warm up; UPTO (default: all) the last migration applied. Uses the
# PostgreSQL that scripts/services.sh finds or starts; the database it
# creates is dropped at exit. Figures: docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/services.sh
source scripts/services.sh

CALLS=${CALLS:-500}
UPTO=${UPTO:-}
DB=bench_append_$$
psql=$(_chat_svc_psql)
pgbench=$(command -v pgbench || echo "${CHAT_TEST_PG_BIN:-}/pgbench")
[[ -x $pgbench ]] || pgbench=$(ls /usr/lib/postgresql/*/bin/pgbench | tail -n 1)
"$psql" -q -d "$CHAT_TEST_DATABASE_URL" -c "CREATE DATABASE $DB"
URL=${CHAT_TEST_DATABASE_URL%/*}/$DB
WORK=$(mktemp -d)
cleanup() {
    "$psql" -q -d "$CHAT_TEST_DATABASE_URL" -c "DROP DATABASE IF EXISTS $DB" || true
    rm -rf "$WORK"
}
trap 'cleanup; chat_services_stop' EXIT

for file in migrations/postgres/*.sql; do
    name=$(basename "$file")
    [[ -n $UPTO && ${name%%_*} > $UPTO ]] && break
    "$psql" -q -v ON_ERROR_STOP=1 -d "$URL" -f "$file"
done
"$psql" -q -v ON_ERROR_STOP=1 -d "$URL" <<SQL
INSERT INTO rooms (id, kind, name, created_at)
SELECT 'r' || g, 'public', 'Room ' || g, 0 FROM generate_series(1, 2000) g;
CREATE SEQUENCE bench_ids;
-- The store's session settings (src/store/postgres.rs, SESSION_SETTINGS).
ALTER DATABASE $DB SET plan_cache_mode = force_generic_plan;
ALTER DATABASE $DB SET enable_seqscan = off;
SQL

# One call: 250 messages, one per room, ids in time order as UUIDv7s are.
cat >"$WORK/append.sql" <<'SQL'
SELECT count(*)
FROM (SELECT array_agg('r' || g ORDER BY g) AS rooms,
             array_agg(lpad(to_hex(nextval('bench_ids')), 32, '0') ORDER BY g) AS ids,
             array_agg('u' || g ORDER BY g) AS users,
             array_agg(md5(random()::text) ORDER BY g) AS clients
      FROM generate_series(1, 250) g) AS b,
     LATERAL chat_append_batch(b.rooms, b.ids, b.users, b.users,
                               array_fill('a short chat message body'::text, ARRAY[250]),
                               b.clients, array_fill(1700000000000::bigint, ARRAY[250]));
SQL

# CPU time (clock ticks) of the server's processes (every one is named
# `postgres`, the postmaster and its children alike), including the finished
# children the postmaster has reaped (pgbench's session ends in there).
server_ticks() {
    local pid total=0 fields
    # pgbench's session has just ended: read once the postmaster has
    # reaped its backend, or that backend's CPU may be in neither reading
    # (seen as calls that cost 0.01 ms).
    sleep 1
    for pid in $(pgrep -x postgres); do
        fields=$(awk '{print $14 + $15 + $16 + $17}' "/proc/$pid/stat" 2>/dev/null) || continue
        total=$((total + fields))
    done
    echo "$total"
}

"$pgbench" -n -c 1 -t 20 -f "$WORK/append.sql" "$URL" >/dev/null
before=$(server_ticks)
tps=$("$pgbench" -n -c 1 -t "$CALLS" -f "$WORK/append.sql" "$URL" | sed -n 's/^tps = \([0-9.]*\).*/\1/p')
after=$(server_ticks)
awk -v tps="$tps" -v ticks=$((after - before)) -v hz="$(getconf CLK_TCK)" -v calls="$CALLS" -v upto="${UPTO:-all}" 'BEGIN {
    ms = ticks * 1000 / hz / calls
    printf "{\"migrations_upto\":\"%s\",\"calls\":%d,\"calls_per_second\":%.1f,\"postgres_cpu_ms_per_call\":%.2f,\"postgres_cpu_us_per_message\":%.1f}\n", upto, calls, tps, ms, ms * 1000 / 250
}'
