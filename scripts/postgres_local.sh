#!/usr/bin/env bash
# A PostgreSQL server on this machine, for testing `poolbench tune --storage postgresql://...` for real.
#
#   scripts/postgres_local.sh start    install Debian's postgresql if missing (root), create a cluster, start it
#   scripts/postgres_local.sh stop     stop the server this script started (its own pid file, nothing else)
#   scripts/postgres_local.sh url      print the SQLAlchemy URL of the running server; exit 1 when it does not answer
#   scripts/postgres_local.sh status   pg_isready; exit 1 when the server does not answer
#
# Idempotent: `start` on a running server only checks it. As root (CI) the server runs as the `postgres`
# user with its cluster in /var/lib/poolbench-postgres; as another user, in /tmp/poolbench-postgres-$USER.
# It listens on 127.0.0.1:${POOLBENCH_PG_PORT:-54329} only, trusts local connections, and holds one database,
# `poolbench`. Nothing else on the machine is touched (a system PostgreSQL keeps running on its own port).
set -euo pipefail

PORT=${POOLBENCH_PG_PORT:-54329}
DB=poolbench
if [ "$(id -u)" -eq 0 ]; then
    STATE_DIR=/var/lib/poolbench-postgres
    RUN_AS=(runuser -u postgres --)
    SUPERUSER=postgres
else
    STATE_DIR=/tmp/poolbench-postgres-$(id -un)
    RUN_AS=()
    SUPERUSER=$(id -un)
fi
DATA=$STATE_DIR/data
URL="postgresql://$SUPERUSER@127.0.0.1:$PORT/$DB"

log() { echo "postgres_local: $*" >&2; }

bindir() {
    local dir
    dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1 || true)
    if [ -z "$dir" ] && command -v pg_ctl >/dev/null; then dir=$(dirname "$(command -v pg_ctl)"); fi
    echo "$dir"
}

answers() {
    local bin
    bin=$(bindir)
    [ -n "$bin" ] && "$bin/pg_isready" -q -h 127.0.0.1 -p "$PORT" -d "$DB" -U "$SUPERUSER" -t 5
}

install_packages() {
    if [ -n "$(bindir)" ]; then
        return
    fi
    if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
        log "PostgreSQL is not installed (Debian: apt-get install postgresql, as root)"
        exit 1
    fi
    log "installing postgresql"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends postgresql >/dev/null
}

start() {
    if answers; then
        log "already running: $URL"
        return
    fi
    install_packages
    local bin
    bin=$(bindir)
    mkdir -p "$STATE_DIR"
    if [ "$(id -u)" -eq 0 ]; then chown postgres: "$STATE_DIR"; fi
    if [ ! -s "$DATA/PG_VERSION" ]; then
        "${RUN_AS[@]}" "$bin/initdb" -D "$DATA" -U "$SUPERUSER" -A trust -E UTF8 >"$STATE_DIR/initdb.log"
    fi
    "${RUN_AS[@]}" "$bin/pg_ctl" -D "$DATA" -l "$STATE_DIR/server.log" -w -t 60 \
        -o "-p $PORT -c listen_addresses=127.0.0.1 -k $STATE_DIR -c max_connections=200" start >/dev/null
    if ! "${RUN_AS[@]}" "$bin/psql" -h 127.0.0.1 -p "$PORT" -U "$SUPERUSER" -d postgres -tAc \
        "SELECT 1 FROM pg_database WHERE datname = '$DB'" | grep -q 1; then
        "${RUN_AS[@]}" "$bin/createdb" -h 127.0.0.1 -p "$PORT" -U "$SUPERUSER" "$DB"
    fi
    answers || { log "the server did not answer; see $STATE_DIR/server.log"; exit 1; }
    log "up: $URL"
}

stop() {
    local bin
    bin=$(bindir)
    if [ -n "$bin" ] && [ -s "$DATA/postmaster.pid" ]; then
        "${RUN_AS[@]}" "$bin/pg_ctl" -D "$DATA" -m fast -w stop >/dev/null || true
    fi
    log "stopped"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    url) answers && echo "$URL" ;;
    status) answers && echo "up: $URL" ;;
    *) echo "usage: $0 start|stop|url|status" >&2; exit 2 ;;
esac
