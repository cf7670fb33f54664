#!/usr/bin/env bash
# Runs CMD with a throwaway PostgreSQL server and SIGIL_TEST_POSTGRES_URL
# pointing at it, e.g.
#
#   scripts/with-postgres.sh cargo test --lib store::postgres
#
# Uses the PostgreSQL server binaries found on PATH or under
# /usr/lib/postgresql/*/bin; when there are none, installs Debian's
# `postgresql` package (needs root). The cluster lives in a new temporary
# directory owned by the `postgres` user when run as root (initdb and the
# server refuse to run as root), listens on 127.0.0.1 only, on a free port,
# with trust authentication, and is stopped and deleted on exit, whatever
# CMD does. It is a test cluster: fsync is off, unless SIGIL_PG_DURABLE=1
# (benchmarks: fsync and synchronous_commit on, as in production).
#
# Exports SIGIL_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:PORT/postgres
# (and PGHOST/PGPORT/PGUSER, so psql works inside CMD);
# SIGIL_TEST_POSTGRES_CA, the PEM CA of the server's TLS certificate (the
# server accepts TLS and plaintext; the certificate names IP 127.0.0.1
# only; made with openssl, unset without it); and
# SIGIL_TEST_POSTGRES_PGCTL: a script that runs this cluster's pg_ctl as the
# right user with -D set, e.g. `"$SIGIL_TEST_POSTGRES_PGCTL" restart -m fast -w`.
# Exit status: CMD's, or 1 if the server could not be started.
set -euo pipefail

if [[ $# -eq 0 ]]; then
    echo "usage: $0 CMD [ARGS...]" >&2
    exit 2
fi

log() { echo "with-postgres: $*" >&2; }

# runuser and useradd live in sbin, which a non-login PATH may lack.
export PATH="$PATH:/usr/sbin:/sbin"

# The directory holding initdb, pg_ctl and postgres, or nothing.
find_bindir() {
    local pg_ctl dir
    if pg_ctl="$(command -v pg_ctl 2>/dev/null)"; then
        dir="$(dirname "$(readlink -f "$pg_ctl")")"
        if [[ -x "$dir/initdb" && -x "$dir/postgres" ]]; then
            echo "$dir"
            return
        fi
    fi
    # Newest version first.
    for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -t/ -k5 -V -r); do
        if [[ -x "$dir/pg_ctl" && -x "$dir/initdb" && -x "$dir/postgres" ]]; then
            echo "$dir"
            return
        fi
    done
}

bindir="$(find_bindir)"
if [[ -z "$bindir" ]]; then
    if [[ $EUID -ne 0 ]]; then
        log "no PostgreSQL server binaries found; install Debian's postgresql package (as root)"
        exit 1
    fi
    log "installing Debian's postgresql package"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq postgresql >&2
    bindir="$(find_bindir)"
    if [[ -z "$bindir" ]]; then
        log "postgresql installed but no server binaries found"
        exit 1
    fi
fi

# As root, the server runs as `postgres` (created by the package; created
# here if the binaries came without it).
if [[ $EUID -eq 0 ]]; then
    if ! id -u postgres >/dev/null 2>&1; then
        useradd --system --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin postgres
    fi
    run_pg() { (cd "$tmp" && runuser -u postgres -- "$@"); }
else
    run_pg() { (cd "$tmp" && "$@"); }
fi

tmp="$(mktemp -d "${TMPDIR:-/tmp}/sigil-pg.XXXXXX")"
chmod 700 "$tmp"
[[ $EUID -eq 0 ]] && chown postgres: "$tmp"
data="$tmp/data"
started=0

cleanup() {
    local status=$?
    if [[ $started -eq 1 ]]; then
        run_pg "$bindir/pg_ctl" -D "$data" -m immediate -w stop >/dev/null 2>&1 || true
    fi
    rm -rf "$tmp"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

run_pg "$bindir/initdb" -D "$data" -U postgres -A trust -E UTF8 --locale=C --no-sync >"$tmp/initdb.log" 2>&1 || {
    cat "$tmp/initdb.log" >&2
    log "initdb failed"
    exit 1
}

# TLS: a throwaway P-256 CA and a server certificate for IP 127.0.0.1 only
# (so a test reaching the server as `localhost` sees a name mismatch).
# Plaintext connections still work; TLS tests trust $SIGIL_TEST_POSTGRES_CA.
ssl_opts=""
if ! command -v openssl >/dev/null 2>&1 && [[ $EUID -eq 0 ]]; then
    log "installing Debian's openssl package (TLS test certificates)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssl >&2 || true
fi
if command -v openssl >/dev/null 2>&1; then
    ssl="$tmp/ssl"
    mkdir "$ssl"
    if (
        cd "$ssl"
        p256=(-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes)
        openssl req -x509 "${p256[@]}" -keyout ca.key -out ca.crt -days 2 \
            -subj "/CN=sigil test PostgreSQL CA" \
            -addext "basicConstraints=critical,CA:TRUE" \
            -addext "keyUsage=critical,keyCertSign,cRLSign"
        openssl req "${p256[@]}" -keyout server.key -out server.csr -subj "/CN=127.0.0.1"
        printf '%s\n' "subjectAltName=IP:127.0.0.1" "basicConstraints=critical,CA:FALSE" \
            "keyUsage=critical,digitalSignature" "extendedKeyUsage=serverAuth" >server.ext
        openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
            -out server.crt -days 2 -extfile server.ext
        chmod 600 server.key ca.key
    ) >"$tmp/openssl.log" 2>&1; then
        [[ $EUID -eq 0 ]] && chown -R postgres: "$ssl"
        ssl_opts="-c ssl=on -c ssl_cert_file=$ssl/server.crt -c ssl_key_file=$ssl/server.key"
        export SIGIL_TEST_POSTGRES_CA="$ssl/ca.crt"
    else
        cat "$tmp/openssl.log" >&2
        log "could not make TLS test certificates; TLS tests will be skipped"
    fi
else
    log "no openssl: the server runs without TLS and TLS tests will be skipped"
fi

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Pick a free port; if another process takes it first, the start fails and
# the next candidate is tried.
if [[ "${SIGIL_PG_DURABLE:-0}" == 1 ]]; then
    durability="-c fsync=on -c synchronous_commit=on -c full_page_writes=on"
else
    durability="-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
fi
for _ in $(seq 1 20); do
    port=$((20000 + RANDOM % 40000))
    port_in_use "$port" && continue
    if run_pg "$bindir/pg_ctl" -D "$data" -l "$tmp/server.log" -w -t 60 -o "\
            -c listen_addresses=127.0.0.1 -p $port -c unix_socket_directories=$tmp \
            -c max_connections=300 $durability $ssl_opts" start >/dev/null; then
        started=1
        break
    fi
done
if [[ $started -ne 1 ]]; then
    tail -n 30 "$tmp/server.log" >&2 || true
    log "could not start PostgreSQL"
    exit 1
fi
log "PostgreSQL $("$bindir/postgres" --version | awk '{print $3}') on 127.0.0.1:$port"

export SIGIL_TEST_POSTGRES_URL="postgres://postgres@127.0.0.1:$port/postgres"
export PGHOST=127.0.0.1 PGPORT="$port" PGUSER=postgres

# pg_ctl for this cluster (restart reuses the start options, postmaster.opts).
pgctl="$tmp/pg_ctl"
if [[ $EUID -eq 0 ]]; then
    printf '#!/bin/sh\ncd %q && exec runuser -u postgres -- %q -D %q -l %q "$@"\n' \
        "$tmp" "$bindir/pg_ctl" "$data" "$tmp/server.log" >"$pgctl"
else
    printf '#!/bin/sh\ncd %q && exec %q -D %q -l %q "$@"\n' \
        "$tmp" "$bindir/pg_ctl" "$data" "$tmp/server.log" >"$pgctl"
fi
chmod 755 "$pgctl"
export SIGIL_TEST_POSTGRES_PGCTL="$pgctl"

set +e
"$@"
status=$?
set -e
exit "$status"
