#!/usr/bin/env bash
# Regenerates BENCHMARKS.md: builds release, runs every measurement one at a
# time on this machine, then rewrites the generated section of BENCHMARKS.md
# (the hand-written text around it is kept). Takes about 20–30 minutes,
# most of it the 1,000,000-row prefill and the four large-store runs; run it
# on a quiet machine.
#
# usage: scripts/bench.sh [--quick]
#   --quick   3 s runs, 100,000-row prefill, 2 startup runs (a smoke test, ~6 min)
# env: BENCH_DURATION (10s), BENCH_STORE_DURATION (40s), BENCH_PREFILL (1000000),
#      BENCH_STORE_TOKENS (300000, 60000 with --quick: requests prepared for each
#      large-store run),
#      BENCH_RESULTS (target/bench-results),
#      BENCH_CFSSL (1; 0 skips the CFSSL peer), BENCH_CRITERION (1; 0 skips cargo bench),
#      BENCH_PG (1; 0 skips ha-postgres, which runs under scripts/with-postgres.sh)
# Raw results (JSON per run, SVG latency plots, cfssl.txt) stay in $BENCH_RESULTS.
# sigil-bench is built with --features test-support (the generated Nitro PKI and
# OIDC issuer of enroll-nitro / enroll-oidc); the sigil binary measured for
# startup and RSS is built without it.
set -euo pipefail
cd "$(dirname "$0")/.."

DUR=${BENCH_DURATION:-10s}
STORE_DUR=${BENCH_STORE_DURATION:-40s}
PREFILL=${BENCH_PREFILL:-1000000}
STARTUP_RUNS=5
STORE_TOKENS_DEFAULT=300000
if [[ "${1:-}" == "--quick" ]]; then
  DUR=${BENCH_DURATION:-3s}; PREFILL=${BENCH_PREFILL:-100000}; STARTUP_RUNS=2
  STORE_TOKENS_DEFAULT=60000
elif [[ $# -gt 0 ]]; then
  sed -n '2,12p' "$0"; exit 2
fi
R=${BENCH_RESULTS:-target/bench-results}
CONCS="1 8 64 256"
B=target/release/sigil-bench
SIGIL=target/release/sigil
CFSSL_PEER=../shared/bench/cfssl-peer.sh
ATTEST_CONCS="8 64"

log() { printf '\n== %s ==\n' "$*" >&2; }
now() { date -u '+%Y-%m-%d %H:%M:%S UTC'; }
# A load run: exit 3 means "finished, some requests failed": keep going, the report shows it.
run() {
  local out=$1; shift
  local rc=0
  "$B" "$@" --json --plot "$R/${out%.json}.svg" > "$R/$out" || rc=$?
  if [[ $rc -ne 0 && $rc -ne 3 ]]; then echo "sigil-bench $* failed (exit $rc)" >&2; exit 1; fi
}
rps_of() { sed -n 's/^  "rps": \([0-9.]*\),*$/\1/p' "$1"; }

log "build (release)"
# Two builds: the feature only compiles sigil::attest::testing (evidence
# generators) into sigil-bench; the broker binary stays the default build.
cargo build --release --locked --bin sigil
cargo build --release --locked --features test-support --bin sigil-bench
mkdir -p "$R"
rm -f "$R"/*.json "$R"/*.svg "$R"/cfssl.txt
STARTED=$(now)
LOAD_AT_START=$(cut -d' ' -f1-3 /proc/loadavg)

log "crypto floor"
"$B" floor --secs 1 --json > "$R/floor.json"

log "enroll-token, no JWT"
for c in $CONCS; do run "tok-off-c$c.json" enroll-token -c "$c" -d "$DUR"; done

if [[ "${BENCH_CFSSL:-1}" == 1 && -x "$CFSSL_PEER" ]]; then
  log "CFSSL authsign peer (same session)"
  "$CFSSL_PEER" "$CONCS" "${DUR%s}" 1 | tee "$R/cfssl.txt" >&2 || echo "cfssl peer failed" >&2
else
  echo "skipping the CFSSL peer (BENCH_CFSSL=0 or $CFSSL_PEER missing)" >&2
fi

log "enroll-token, with JWT"
for c in $CONCS; do run "tok-on-c$c.json" enroll-token -c "$c" -d "$DUR" --jwt; done

log "fresh-connection"
for c in $CONCS; do run "fresh-c$c.json" fresh-connection -c "$c" -d "$DUR"; done

log "renew and fetch-jwt (mTLS, one connection per client)"
for c in $CONCS; do run "renew-c$c.json" renew -c "$c" -d "$DUR"; done
for c in $CONCS; do run "fetchjwt-c$c.json" fetch-jwt -c "$c" -d "$DUR"; done

log "attestation enrollment: enroll-nitro and enroll-oidc (generated test PKI / issuer)"
for c in $ATTEST_CONCS; do run "nitro-c$c.json" enroll-nitro -c "$c" -d "$DUR"; done
for c in $ATTEST_CONCS; do run "oidc-c$c.json" enroll-oidc -c "$c" -d "$DUR"; done

log "latency at half of peak throughput (open loop, 64 clients)"
for jwt in off on; do
  peak=0
  for c in $CONCS; do
    v=$(rps_of "$R/tok-$jwt-c$c.json"); v=${v%.*}
    if [[ -n "$v" && "$v" -gt "$peak" ]]; then peak=$v; fi
  done
  run "half-$jwt.json" enroll-token -c 64 -d "$DUR" --jwt "$jwt" --rate $((peak / 2 > 0 ? peak / 2 : 1))
done

# 40 s, so the timed phase spans one 30 s maintenance tick (purge + CRL refresh).
# The pool of prepared requests is sized explicitly and equally for both: by
# default it follows the 1 s warm-up, which on the big store runs on cold
# caches and sized the pool too small (the run then stops early).
# The store is filled once (a 1 s run after the prefill, its figures unused)
# and synced to disk, so that the prefill's writeback does not fall into a
# timed phase. The four timed runs alternate prefilled, empty, empty,
# prefilled: the machine drifts by 10 % and more over minutes, and a single
# pair charged that drift to whichever ran second. Before each prefilled run
# the store's nonces get expiries spread over the next 360 s (window + skew),
# so the run pays the purge of a full window in steady state (N ÷ 360 s
# deletions per second); otherwise none would expire during the run.
STORE_TOKENS=${BENCH_STORE_TOKENS:-$STORE_TOKENS_DEFAULT}
log "large store: empty vs $PREFILL prefilled rows (64 clients, no JWT, $STORE_DUR, interleaved)"
BIG=$(mktemp -d "${TMPDIR:-/tmp}/sigil-bench-store.XXXXXX")
trap 'rm -rf "$BIG"' EXIT
"$B" enroll-token -c 64 -d 1s --data-dir "$BIG/data" --prefill "$PREFILL" --json > "$R/store-fill.json"
sync
run store-prefill-1.json enroll-token -c 64 -d "$STORE_DUR" --tokens "$STORE_TOKENS" --data-dir "$BIG/data" --expire-nonces-over 360
sync
run store-empty-1.json enroll-token -c 64 -d "$STORE_DUR" --tokens "$STORE_TOKENS"
sync
run store-empty-2.json enroll-token -c 64 -d "$STORE_DUR" --tokens "$STORE_TOKENS"
sync
run store-prefill-2.json enroll-token -c 64 -d "$STORE_DUR" --tokens "$STORE_TOKENS" --data-dir "$BIG/data" --expire-nonces-over 360
rm -rf "$BIG"

if [[ "${BENCH_PG:-1}" == 1 ]]; then
  # fsync and synchronous_commit on, like the fsynced SQLite runs (the test
  # cluster's default is fsync off). A fresh database per replica count.
  # Then 3 replicas again with their sessions over verified TLS
  # (--store-ca-file; the throwaway server's CA), on the same server.
  log "ha-postgres: 1 vs 3 replicas on one PostgreSQL (fsync on), then 3 over TLS; 64 clients, no JWT"
  rc=0
  SIGIL_PG_DURABLE=1 B="$B" DUR="$DUR" R="$R" scripts/with-postgres.sh bash -c '
    rc=0
    "$B" ha-postgres -c 64 -d "$DUR" --replicas 1,3 \
        --json --plot "$R/ha-pg-c64.svg" > "$R/ha-pg-c64.json" || rc=$?
    if [[ $rc -ne 0 && $rc -ne 3 ]]; then
      echo "ha-postgres failed (exit $rc); the report will say not measured" >&2
      rm -f "$R/ha-pg-c64.json"
    fi
    if [[ -n "${SIGIL_TEST_POSTGRES_CA:-}" ]]; then
      rc=0
      "$B" ha-postgres -c 64 -d "$DUR" --replicas 3 --store-ca-file "$SIGIL_TEST_POSTGRES_CA" \
          --json --plot "$R/ha-pg-tls-c64.svg" > "$R/ha-pg-tls-c64.json" || rc=$?
      if [[ $rc -ne 0 && $rc -ne 3 ]]; then
        echo "ha-postgres over TLS failed (exit $rc); not reported" >&2
        rm -f "$R/ha-pg-tls-c64.json"
      fi
    else
      echo "no SIGIL_TEST_POSTGRES_CA (openssl missing?): ha-postgres over TLS skipped" >&2
    fi
  ' || rc=$?
  if [[ $rc -ne 0 ]]; then
    echo "with-postgres.sh failed (exit $rc)" >&2
  fi
else
  echo "skipping ha-postgres (BENCH_PG=0)" >&2
fi

log "real binary as a separate process: loaded RSS"
D=$(mktemp -d)
# The load generator is one loopback peer: exempt it from the per-peer abuse limits.
printf '[rate_limits]\nexempt = ["127.0.0.0/8"]\n' > "$D/sigil.toml"
"$SIGIL" serve --config "$D/sigil.toml" --data-dir "$D/data" --listen 127.0.0.1:0 >/dev/null 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null || true; rm -rf "$D"' EXIT
for _ in $(seq 1 200); do [[ -s "$D/data/listen.addr" ]] && break; sleep 0.05; done
URL="https://$(cat "$D/data/listen.addr")"
for c in 64 256; do
  run "ext-c$c.json" enroll-token -c "$c" -d "$DUR" --broker "$URL" \
      --admin-socket "$D/data/admin.sock" --broker-pid "$PID"
done
kill -TERM "$PID"; wait "$PID" || true
rm -rf "$D"; trap - EXIT

log "startup of the real binary"
"$B" startup --sigil "$SIGIL" --runs "$STARTUP_RUNS" --json > "$R/startup.json"

ENDED=$(now)
cat > "$R/meta.json" <<JSON
{"started": "$STARTED", "ended": "$ENDED",
 "note": "load average at start $LOAD_AT_START; timed phases of $DUR; see the other-procs CPU column for what else ran"}
JSON

if [[ "${BENCH_CRITERION:-1}" == 1 ]]; then
  log "criterion micro-benchmarks"
  cargo bench --locked --bench crypto --bench store --bench tls
fi

log "report"
"$B" report --results "$R" --out BENCHMARKS.md
echo "BENCHMARKS.md updated; raw results and plots in $R" >&2
