#!/usr/bin/env bash
# Short fuzz smoke run: every cargo-fuzz target in fuzz/ for SECONDS each
# (default 60), starting from fuzz/seeds/<target>/ and the local corpus.
#
#   scripts/fuzz-smoke.sh [SECONDS] [TARGET...]
#
# Needs cargo-fuzz (installed from crates.io when missing) and a nightly
# toolchain; without one, the stable toolchain is used with RUSTC_BOOTSTRAP=1
# (needed for -Zsanitizer). Builds with debug assertions, so integer
# overflow panics too. A crash stops that target; its input is left in
# fuzz/artifacts/<target>/ — copy it to fuzz/regressions/<target>/ so
# `cargo test` replays it (tests/it/fuzz_regressions.rs), and fix the bug.
# Exit status: 0 when no target crashed, 1 otherwise.
set -euo pipefail

secs="${1:-60}"
[[ $# -gt 0 ]] && shift
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root/fuzz"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz-smoke: installing cargo-fuzz from crates.io" >&2
    cargo install cargo-fuzz --locked
fi
toolchain=()
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    toolchain=(+nightly)
else
    echo "fuzz-smoke: no nightly toolchain; using stable with RUSTC_BOOTSTRAP=1" >&2
    export RUSTC_BOOTSTRAP=1
fi
fuzz=(cargo "${toolchain[@]}" fuzz)

if [[ $# -gt 0 ]]; then
    targets=("$@")
else
    mapfile -t targets < <("${fuzz[@]}" list)
fi

# The in-process brokers make temp dirs that a libFuzzer process never
# removes (they live in statics): keep them in one place and remove it.
work="$(mktemp -d "${TMPDIR:-/tmp}/sigil-fuzz-smoke.XXXXXX")"
trap 'rm -rf "$work"' EXIT

"${fuzz[@]}" build --debug-assertions

failed=()
summary=()
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "seeds/$t" "$work/tmp-$t"
    echo "== $t: ${secs}s" >&2
    log="$work/$t.log"
    status=0
    TMPDIR="$work/tmp-$t" "${fuzz[@]}" run --debug-assertions "$t" "corpus/$t" "seeds/$t" -- \
        -max_total_time="$secs" -print_final_stats=1 -timeout=20 -rss_limit_mb=4096 \
        >"$log" 2>&1 || status=$?
    execs="$(grep -o 'stat::number_of_executed_units: [0-9]*' "$log" | grep -o '[0-9]*$' | tail -1 || true)"
    cov="$(grep -oE 'cov: [0-9]+ ft: [0-9]+' "$log" | tail -1 || true)"
    if [[ $status -ne 0 ]]; then
        failed+=("$t")
        summary+=("$t: CRASH after ${execs:-?} execs (status $status)")
        grep -E 'panicked at|ERROR: |SUMMARY: |Test unit written to' "$log" >&2 || tail -40 "$log" >&2
    else
        summary+=("$t: ok, ${execs:-?} execs in ${secs}s (${cov:-no coverage line})")
    fi
    rm -rf "$work/tmp-$t"
done

printf '%s\n' "${summary[@]}"
if [[ ${#failed[@]} -gt 0 ]]; then
    echo "fuzz-smoke: crashed: ${failed[*]} (inputs in fuzz/artifacts/<target>/)" >&2
    exit 1
fi
