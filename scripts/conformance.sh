#!/usr/bin/env bash
# libiscsi's conformance suite against the daemon.
#
# Builds the release daemon, serves a fresh 1 GiB sparse image on a loopback port, runs
# `iscsi-test-cu --dataloss -t ALL` (every test once) with both of its initiator names (on
# loopback the daemon admits every initiator), stops the daemon with SIGTERM, and checks the
# per-test verdicts against tests/conformance/expected-not-passing.txt (scripts/conformance/
# check.sh says how). Writes to out/conformance/: results.txt (per-test verdicts), the raw
# iscsi-test-cu output and the daemon's log. The last line is "N passed, N failed, N skipped".
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
out=$root/out/conformance
expected=$root/tests/conformance/expected-not-passing.txt
init1=iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-test
init2=iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-test-2
suite_timeout=1800

command -v iscsi-test-cu >/dev/null || {
    echo "conformance: iscsi-test-cu not found (Debian package libiscsi-bin)" >&2
    exit 1
}

cargo build --release --locked -p sharedisk --manifest-path "$root/Cargo.toml"
bin=${CARGO_TARGET_DIR:-$root/target}/release/sharedisk

rm -rf "$out"
mkdir -p "$out"
work=$(mktemp -d)
daemon=""
cleanup() {
    if [[ -n $daemon ]] && kill -0 "$daemon" 2>/dev/null; then
        kill -KILL "$daemon" 2>/dev/null || true
        wait "$daemon" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

RUST_LOG=${RUST_LOG:-info} "$bin" serve --file "$work/disk.img" --size 1G \
    --listen 127.0.0.1:0 >"$work/daemon.out" 2>"$out/daemon.log" &
daemon=$!

url=""
for _ in $(seq 300); do
    url=$(head -n 1 "$work/daemon.out")
    [[ $url == iscsi://* ]] && break
    kill -0 "$daemon" 2>/dev/null || break
    sleep 0.1
done
if [[ $url != iscsi://* ]]; then
    echo "conformance: the daemon printed no URL; its log:" >&2
    cat "$out/daemon.log" >&2
    exit 1
fi
echo "conformance: testing $url"

iscsi-test-cu -l >"$out/test-list.txt"
status=0
timeout --kill-after=10 "$suite_timeout" iscsi-test-cu --dataloss -t ALL -i "$init1" -I "$init2" \
    "$url" >"$out/iscsi-test-cu.log" 2>"$out/iscsi-test-cu.stderr.log" || status=$?
# iscsi-test-cu exits non-zero when a test fails; only a time-out is an error of its own.
if ((status == 124 || status == 137)); then
    echo "conformance: iscsi-test-cu did not finish in ${suite_timeout}s" >&2
fi

daemon_ok=1
if kill -TERM "$daemon" 2>/dev/null; then
    for _ in $(seq 300); do
        kill -0 "$daemon" 2>/dev/null || break
        sleep 0.1
    done
fi
if kill -0 "$daemon" 2>/dev/null; then
    echo "conformance: the daemon did not stop within 30 s of SIGTERM" >&2
    daemon_ok=0
else
    daemon_status=0
    wait "$daemon" || daemon_status=$?
    if ((daemon_status != 0)); then
        echo "conformance: the daemon exited with status $daemon_status; its log ends:" >&2
        tail -n 20 "$out/daemon.log" >&2
        daemon_ok=0
    fi
fi
daemon=""

awk -f "$root/scripts/conformance/parse.awk" "$out/test-list.txt" "$out/iscsi-test-cu.log" \
    >"$out/results.txt"
check=0
"$root/scripts/conformance/check.sh" "$out/results.txt" "$expected" || check=$?
((check == 0 && daemon_ok == 1 && status != 124 && status != 137))
