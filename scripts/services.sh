#!/usr/bin/env bash
# Make a PostgreSQL and a Redis available for the test suite.
#
#   source scripts/services.sh        # from scripts/test.sh (set -euo pipefail is fine)
#   eval "$(scripts/services.sh)"     # by hand: prints `export VAR=...` lines
#
# Running services are reused when they answer; otherwise throwaway servers are
# started from the installed binaries in fresh temp directories on free ports
# (the packages are installed with apt-get when the binaries are missing).
# Exports:
#   CHAT_TEST_DATABASE_URL  postgres:// URL to a database where tests may CREATE SCHEMA
#   CHAT_TEST_REDIS_URL     redis:// URL
#   CHAT_TEST_REDIS_SERVER  absolute path of a redis-server binary
#   CHAT_TEST_PG_BIN        directory holding initdb, pg_ctl and postgres
#
# When sourced, throwaway servers are stopped and their directories removed by
# `chat_services_stop`, which runs from the shell's EXIT trap (composed with any
# trap already set). NB: the trap cannot run if the sourcing script `exec`s its
# last command, so call `cargo test` without exec. When executed directly, the
# throwaway servers keep running and the way to stop them is printed to stderr.
#
# Every function reports failure through its return status rather than relying
# on `set -e`, because errexit is ignored inside functions called from `if`/`||`
# and the caller may or may not have it on. All names are prefixed so that
# sourcing does not clobber the caller's variables.

# SC2016: the single-quoted bash -c scripts and RESP templates are meant literally.
# shellcheck disable=SC2016

_chat_svc_say() { printf 'services: %s\n' "$*" >&2; }

# The URL with any password replaced by ***, for printing.
_chat_svc_mask() {
    local url=$1 scheme authority rest userinfo
    if [[ $url =~ ^([A-Za-z][A-Za-z0-9+.-]*://)([^/?#]*)(.*)$ ]]; then
        scheme=${BASH_REMATCH[1]} authority=${BASH_REMATCH[2]} rest=${BASH_REMATCH[3]}
        if [[ $authority == *@* ]]; then
            userinfo=${authority%@*} # up to the last @: a raw password may hold one
            [[ $userinfo == *:* ]] && userinfo="${userinfo%%:*}:***"
            authority="$userinfo@${authority##*@}"
        fi
        url=$scheme$authority$rest
    fi
    # ?password=... in a URL, password=... in a key=value conninfo string.
    printf '%s\n' "$url" | sed -E 's/(password=)[^&# ]*/\1***/g'
}

# A TCP port on 127.0.0.1 that nothing listens on right now.
_chat_svc_free_port() {
    local port
    if command -v python3 >/dev/null 2>&1 &&
        port=$(python3 -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])' 2>/dev/null) && [[ $port =~ ^[0-9]+$ ]]; then
        printf '%s\n' "$port"
        return 0
    fi
    # No python3: probe random high ports; a refused connection means free.
    local _
    for _ in {1..100}; do
        port=$((20000 + RANDOM % 40000))
        if ! timeout 2 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1"' _ "$port" 2>/dev/null; then
            printf '%s\n' "$port"
            return 0
        fi
    done
    _chat_svc_say "could not find a free TCP port"
    return 1
}

# ---------------------------------------------------------------------------
# Packages

_chat_svc_apt_updated=${_chat_svc_apt_updated:-}

_chat_svc_apt_install() {
    if ((EUID != 0)) || ! command -v apt-get >/dev/null 2>&1; then
        _chat_svc_say "cannot install $* (needs root and apt-get); install it and retry"
        return 1
    fi
    local log
    log=$(mktemp -t chat-apt.XXXXXX) || return 1
    _chat_svc_say "installing $* with apt-get"
    # Wait for a held dpkg lock instead of failing straight away.
    local -a apt=(apt-get -q -y -o DPkg::Lock::Timeout=300)
    if [[ -z $_chat_svc_apt_updated ]]; then
        if ! "${apt[@]}" update >"$log" 2>&1; then
            _chat_svc_say "apt-get update failed:"
            tail -n 20 "$log" >&2
            rm -f "$log"
            return 1
        fi
        _chat_svc_apt_updated=1
    fi
    if ! DEBIAN_FRONTEND=noninteractive "${apt[@]}" install --no-install-recommends "$@" \
        </dev/null >"$log" 2>&1; then
        _chat_svc_say "apt-get install $* failed:"
        tail -n 20 "$log" >&2
        rm -f "$log"
        return 1
    fi
    rm -f "$log"
}

# The directory holding initdb, pg_ctl and postgres: the highest version under
# /usr/lib/postgresql first (Debian's layout), then wherever pg_ctl is on PATH.
_chat_svc_find_pg_bin() {
    local dir pg_ctl
    local -a dirs=()
    [[ -n ${CHAT_TEST_PG_BIN:-} ]] && dirs+=("$CHAT_TEST_PG_BIN")
    if compgen -G '/usr/lib/postgresql/*/bin' >/dev/null; then
        while IFS= read -r dir; do
            dirs+=("$dir")
        done < <(printf '%s\n' /usr/lib/postgresql/*/bin | sort -rV)
    fi
    if pg_ctl=$(command -v pg_ctl 2>/dev/null); then
        dirs+=("$(dirname "$pg_ctl")" "$(dirname "$(readlink -f "$pg_ctl")")")
    fi
    for dir in "${dirs[@]}"; do
        if [[ $dir == /* && -x $dir/initdb && -x $dir/pg_ctl && -x $dir/postgres ]]; then
            printf '%s\n' "$dir"
            return 0
        fi
    done
    return 1
}

_chat_svc_find_redis_server() {
    local path
    for path in "${CHAT_TEST_REDIS_SERVER:-}" "$(command -v redis-server 2>/dev/null || true)" \
        /usr/bin/redis-server /usr/local/bin/redis-server; do
        [[ -n $path && -x $path && ! -d $path ]] || continue
        # Absolute, but symlinks are kept: Debian's redis-server is a link to a
        # multi-call binary that looks at its own name.
        [[ $path == /* ]] || path=$PWD/$path
        printf '%s\n' "$path"
        return 0
    done
    return 1
}

# psql for the reachability check: on PATH, or next to the server binaries.
_chat_svc_psql() {
    local psql
    if psql=$(command -v psql 2>/dev/null); then
        printf '%s\n' "$psql"
    elif [[ -x ${CHAT_TEST_PG_BIN:-}/psql ]]; then
        printf '%s\n' "$CHAT_TEST_PG_BIN/psql"
    else
        return 1
    fi
}

_chat_svc_ensure_binaries() {
    local dir path
    if ! dir=$(_chat_svc_find_pg_bin); then
        _chat_svc_apt_install postgresql || return 1
        if ! dir=$(_chat_svc_find_pg_bin); then
            _chat_svc_say "installed postgresql but found no directory with initdb, pg_ctl and postgres"
            return 1
        fi
    fi
    export CHAT_TEST_PG_BIN=$dir

    if ! path=$(_chat_svc_find_redis_server); then
        _chat_svc_apt_install redis-server || return 1
        if ! path=$(_chat_svc_find_redis_server); then
            _chat_svc_say "installed redis-server but cannot find the redis-server binary"
            return 1
        fi
    fi
    export CHAT_TEST_REDIS_SERVER=$path

    # Only needed to check a running PostgreSQL; without it that check fails
    # and a throwaway server is used instead.
    if ! _chat_svc_psql >/dev/null; then
        _chat_svc_apt_install postgresql-client || true
    fi
}

# ---------------------------------------------------------------------------
# Reachability checks (quiet; the status says it all)

_chat_svc_pg_ok() {
    local url=$1 psql out
    psql=$(_chat_svc_psql) || return 1
    # -w: never prompt for a password; timeouts: a firewalled host must not hang us.
    out=$(PGCONNECT_TIMEOUT=5 timeout 15 "$psql" -X -w -Atq -d "$url" -c 'select 1' \
        </dev/null 2>/dev/null) || return 1
    [[ $out == 1 ]]
}

_chat_svc_redis_ok() {
    local url=$1 out
    if command -v redis-cli >/dev/null 2>&1; then
        out=$(timeout 5 redis-cli --no-auth-warning -u "$url" ping </dev/null 2>/dev/null) || return 1
        [[ $out == PONG ]]
        return
    fi
    # No redis-cli: speak RESP over bash's /dev/tcp. redis://[[user]:password@]host[:port][/db]
    [[ $url =~ ^redis://(([^@/]*)@)?(\[[^]/]+\]|[^:/?#]+)(:([0-9]+))?([/?#].*)?$ ]] || return 1
    local userinfo=${BASH_REMATCH[2]} host=${BASH_REMATCH[3]} port=${BASH_REMATCH[5]:-6379}
    local user='' password='' request=''
    local LC_ALL=C # RESP lengths count bytes
    host=${host#[} host=${host%]}
    if [[ $userinfo == *:* ]]; then
        user=${userinfo%%:*} password=${userinfo#*:}
        # Percent-decoding (backslashes doubled first so %b keeps them as is).
        password=${password//\\/\\\\} user=${user//\\/\\\\}
        printf -v password '%b' "${password//%/\\x}"
        printf -v user '%b' "${user//%/\\x}"
        # printf -v, not $(...): that would strip the final \n.
        if [[ -n $user ]]; then
            printf -v request '*3\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n' \
                "${#user}" "$user" "${#password}" "$password"
        else
            printf -v request '*2\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n' "${#password}" "$password"
        fi
    fi
    # Passed as arguments (not interpolated) so a password cannot inject code.
    timeout 5 bash -c '
        exec 3<>"/dev/tcp/$1/$2" || exit 1
        printf "%sPING\r\n" "$3" >&3
        while IFS= read -r -t 4 line <&3; do
            [[ $line == +PONG* ]] && exit 0
            [[ $line == -* ]] && exit 1
        done
        exit 1' _ "$host" "$port" "$request" 2>/dev/null
}

# ---------------------------------------------------------------------------
# Throwaway servers. Their state lives in these globals for chat_services_stop.

_chat_svc_pg_dir=${_chat_svc_pg_dir:-}
_chat_svc_redis_dir=${_chat_svc_redis_dir:-}
_chat_svc_redis_pid=${_chat_svc_redis_pid:-}

# Run a command as the postgres system user when we are root (initdb and
# postgres refuse to run as root); as ourselves otherwise.
_chat_svc_as_pg() {
    if ((EUID != 0)); then
        "$@"
    elif command -v runuser >/dev/null 2>&1; then
        runuser -u postgres -- "$@"
    else
        su -s /bin/sh postgres -c "$(printf '%q ' "$@")"
    fi
}

_chat_svc_pg_start() {
    local bin=$CHAT_TEST_PG_BIN dir log port attempt t0
    t0=$(date +%s.%N)
    if ((EUID == 0)) && ! id -u postgres >/dev/null 2>&1; then
        useradd --system --user-group --home-dir /var/lib/postgresql --no-create-home \
            --shell /bin/sh postgres || { _chat_svc_say "cannot create the postgres user"; return 1; }
    fi
    # Under /tmp rather than $TMPDIR: the postgres user must be able to reach
    # it, and the socket path must stay short (Unix sockets allow ~107 bytes).
    dir=$(mktemp -d /tmp/chat-test-pg.XXXXXX) || return 1
    _chat_svc_pg_dir=$dir
    log=$dir/postgres.log
    if ((EUID == 0)); then
        chown postgres: "$dir" || return 1
    fi
    # A subshell in the temp dir, so the server does not start in a directory
    # the postgres user cannot read (it complains about that).
    if ! (cd "$dir" && _chat_svc_as_pg "$bin/initdb" -D "$dir/data" -U postgres -A trust \
        -E UTF8 --locale=C --no-sync) </dev/null >"$dir/initdb.log" 2>&1; then
        _chat_svc_say "initdb failed:"
        tail -n 20 "$dir/initdb.log" >&2
        return 1
    fi
    # The test database, created in single-user mode before the server starts
    # so that no client binary is needed.
    if ! (cd "$dir" && printf 'CREATE DATABASE test;\n' |
        _chat_svc_as_pg "$bin/postgres" --single -D "$dir/data" -c exit_on_error=on postgres) \
        >"$dir/createdb.log" 2>&1; then
        _chat_svc_say "creating the test database failed:"
        tail -n 20 "$dir/createdb.log" >&2
        return 1
    fi
    # Throwaway server: loopback only, socket in the temp dir, durability off
    # for speed, and room for many parallel tests' connection pools.
    cat >>"$dir/data/postgresql.conf" <<EOF

# chat test server (scripts/services.sh)
listen_addresses = '127.0.0.1'
unix_socket_directories = '$dir'
max_connections = 300
fsync = off
synchronous_commit = off
full_page_writes = off
EOF
    # The port is only free when we looked; another process can take it before
    # the server binds, so retry a few times with a fresh one.
    for attempt in 1 2 3; do
        port=$(_chat_svc_free_port) || return 1
        rm -f "$log" # pg_ctl appends; keep only this attempt's messages
        # pg_ctl -w waits until the server accepts connections (or -t expires).
        if (cd "$dir" && _chat_svc_as_pg "$bin/pg_ctl" -D "$dir/data" -l "$log" -w -t 60 \
            -o "-p $port" start) </dev/null >"$dir/pg_ctl.log" 2>&1; then
            export CHAT_TEST_DATABASE_URL="postgres://postgres@127.0.0.1:$port/test"
            _chat_svc_pg_started_in=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1fs", b - a }')
            return 0
        fi
        grep -q 'could not bind\|Address already in use' "$log" 2>/dev/null || break
        _chat_svc_say "PostgreSQL could not bind port $port (attempt $attempt), retrying"
    done
    _chat_svc_say "the throwaway PostgreSQL did not come up; pg_ctl said:"
    tail -n 5 "$dir/pg_ctl.log" >&2
    if [[ -s $log ]]; then
        _chat_svc_say "server log ($log):"
        tail -n 30 "$log" >&2
    fi
    return 1
}

_chat_svc_pg_pid() {
    [[ -n $_chat_svc_pg_dir && -r $_chat_svc_pg_dir/data/postmaster.pid ]] || return 1
    head -n 1 "$_chat_svc_pg_dir/data/postmaster.pid"
}

# The process id reported by the Redis answering on 127.0.0.1:$1.
_chat_svc_redis_server_pid() {
    local port=$1 info
    if command -v redis-cli >/dev/null 2>&1; then
        info=$(timeout 5 redis-cli -h 127.0.0.1 -p "$port" info server </dev/null 2>/dev/null) || return 1
    else
        info=$(timeout 5 bash -c '
            exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 1
            printf "INFO server\r\n" >&3
            while IFS= read -r -t 4 line <&3; do
                printf "%s\n" "$line"
                [[ $line == process_id:* ]] && exit 0
            done
            exit 1' _ "$port" 2>/dev/null) || return 1
    fi
    [[ $info =~ process_id:([0-9]+) ]] || return 1
    printf '%s\n' "${BASH_REMATCH[1]}"
}

_chat_svc_redis_start() {
    local dir log port attempt pid _
    dir=$(mktemp -d -t chat-test-redis.XXXXXX) || return 1
    _chat_svc_redis_dir=$dir
    log=$dir/redis.log
    for attempt in 1 2 3; do
        port=$(_chat_svc_free_port) || return 1
        rm -f "$dir/redis.pid" "$log"
        # --daemonize: the command returns once the server has forked; output
        # goes to files so a daemon never holds the caller's stdout or stderr.
        if ! "$CHAT_TEST_REDIS_SERVER" --port "$port" --bind 127.0.0.1 --save '' \
            --appendonly no --daemonize yes --dir "$dir" --logfile "$log" \
            --pidfile "$dir/redis.pid" </dev/null >>"$dir/redis.out" 2>&1; then
            break
        fi
        for _ in {1..100}; do # up to ~10 s
            # A PING alone is not enough: if another server took the port
            # first, it is the one answering. Ours must report our pid.
            pid=$(cat "$dir/redis.pid" 2>/dev/null || true)
            if [[ -n $pid && $(_chat_svc_redis_server_pid "$port" || true) == "$pid" ]]; then
                export CHAT_TEST_REDIS_URL="redis://127.0.0.1:$port"
                _chat_svc_redis_pid=$pid
                return 0
            fi
            grep -qi 'address already in use' "$log" 2>/dev/null && break
            sleep 0.1
        done
        grep -qi 'address already in use' "$log" 2>/dev/null || break
        _chat_svc_say "Redis could not bind port $port (attempt $attempt), retrying"
    done
    _chat_svc_say "the throwaway Redis did not come up; its log ($log):"
    tail -n 20 "$log" "$dir/redis.out" >&2 2>/dev/null || true
    return 1
}

# True while a process runs. The daemons are not our children, so once they
# exit they linger as zombies until init reaps them (which can take a second or
# two); kill -0 still succeeds on those, hence the look at the state in /proc.
_chat_svc_alive() {
    local stat
    kill -0 "$1" 2>/dev/null || return 1
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 0 # no /proc: trust kill -0
    stat=${stat##*) } # the state follows "(command) "
    [[ ${stat%% *} != [ZX] ]]
}

# Wait up to ~10 s for a process to exit, then kill it.
_chat_svc_reap() {
    local pid=$1 _
    for _ in {1..100}; do
        _chat_svc_alive "$pid" || return 0
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
}

# Stop the throwaway servers started by this shell and remove their temp dirs.
# Safe to call more than once and never fails (it runs from the EXIT trap).
chat_services_stop() {
    local pid
    if [[ -n ${_chat_svc_pg_dir:-} ]]; then
        if pid=$(_chat_svc_pg_pid 2>/dev/null); then
            # Immediate mode: nothing in a throwaway cluster is worth a checkpoint.
            (cd "$_chat_svc_pg_dir" && _chat_svc_as_pg "$CHAT_TEST_PG_BIN/pg_ctl" \
                -D "$_chat_svc_pg_dir/data" -m immediate -w stop) </dev/null >/dev/null 2>&1 ||
                kill -QUIT "$pid" 2>/dev/null || true
            _chat_svc_reap "$pid"
        fi
        rm -rf -- "$_chat_svc_pg_dir" || true
        _chat_svc_pg_dir=''
    fi
    if [[ -n ${_chat_svc_redis_dir:-} ]]; then
        pid=${_chat_svc_redis_pid:-}
        [[ -n $pid ]] || pid=$(cat "$_chat_svc_redis_dir/redis.pid" 2>/dev/null || true)
        if [[ -n $pid ]]; then
            kill -TERM "$pid" 2>/dev/null || true
            _chat_svc_reap "$pid"
        fi
        rm -rf -- "$_chat_svc_redis_dir" || true
        _chat_svc_redis_dir='' _chat_svc_redis_pid=''
    fi
    return 0
}

# Run chat_services_stop on exit, before whatever EXIT trap was already set.
_chat_svc_install_trap() {
    local -a prev=()
    eval "prev=($(trap -p EXIT))" # trap -- 'command' EXIT
    local cmd=${prev[2]:-}
    [[ $cmd == *chat_services_stop* ]] && return 0
    if [[ -z $cmd ]]; then
        trap chat_services_stop EXIT
    else
        # Give the earlier trap the exit status it would have seen; `&& :`
        # keeps errexit from firing on a non-zero status restored this way.
        # shellcheck disable=SC2154 # _chat_svc_rc is assigned inside the trap
        trap '_chat_svc_rc=$?; chat_services_stop; (exit "$_chat_svc_rc") && :
'"$cmd" EXIT
    fi
}

# ---------------------------------------------------------------------------

_chat_svc_main() {
    local sourced=$1 url note pid

    _chat_svc_ensure_binaries || return 1

    # PostgreSQL
    if [[ -n ${CHAT_TEST_DATABASE_URL:-} ]]; then
        url=$CHAT_TEST_DATABASE_URL
    elif [[ ${DATABASE_URL:-} == postgres* ]]; then
        url=$DATABASE_URL
    else
        url=postgres://postgres@127.0.0.1:5432/test
    fi
    if _chat_svc_pg_ok "$url"; then
        export CHAT_TEST_DATABASE_URL=$url
        _chat_svc_say "PostgreSQL at $(_chat_svc_mask "$url") (running)"
    else
        note="$(_chat_svc_mask "$url") not reachable"
        # The trap goes in first, so a failure half-way still cleans up.
        [[ $sourced == yes ]] && _chat_svc_install_trap
        _chat_svc_pg_start || return 1
        pid=$(_chat_svc_pg_pid || echo '?')
        _chat_svc_say "PostgreSQL at $CHAT_TEST_DATABASE_URL (throwaway, pid $pid, up in $_chat_svc_pg_started_in; $note)"
    fi

    # Redis
    url=${CHAT_TEST_REDIS_URL:-${REDIS_URL:-redis://127.0.0.1:6379}}
    if _chat_svc_redis_ok "$url"; then
        export CHAT_TEST_REDIS_URL=$url
        _chat_svc_say "Redis at $(_chat_svc_mask "$url") (running)"
    else
        note="$(_chat_svc_mask "$url") not reachable"
        [[ $sourced == yes ]] && _chat_svc_install_trap
        _chat_svc_redis_start || return 1
        _chat_svc_say "Redis at $CHAT_TEST_REDIS_URL (throwaway, pid ${_chat_svc_redis_pid:-?}; $note)"
    fi
}

if [[ ${BASH_SOURCE[0]} != "$0" ]]; then
    # Sourced: leave the caller's shell options alone; report failure through
    # the status of `source`, after stopping anything half-started.
    if ! _chat_svc_main yes; then
        chat_services_stop
        _chat_svc_say "could not provide PostgreSQL and Redis for the tests"
        return 1
    fi
else
    set -euo pipefail
    if ! _chat_svc_main no; then
        chat_services_stop
        _chat_svc_say "could not provide PostgreSQL and Redis for the tests"
        exit 1
    fi
    for _chat_svc_var in CHAT_TEST_DATABASE_URL CHAT_TEST_REDIS_URL CHAT_TEST_REDIS_SERVER CHAT_TEST_PG_BIN; do
        printf 'export %s=%q\n' "$_chat_svc_var" "${!_chat_svc_var}"
    done
    # Nothing will stop throwaway servers for us: say how.
    if [[ -n $_chat_svc_pg_dir ]]; then
        _chat_svc_say "stop the throwaway PostgreSQL with:" \
            "$( ((EUID == 0)) && printf 'runuser -u postgres -- ')$CHAT_TEST_PG_BIN/pg_ctl -D $_chat_svc_pg_dir/data -m immediate stop && rm -rf $_chat_svc_pg_dir"
    fi
    if [[ -n $_chat_svc_redis_dir ]]; then
        _chat_svc_say "stop the throwaway Redis with: kill $_chat_svc_redis_pid && rm -rf $_chat_svc_redis_dir"
    fi
fi
