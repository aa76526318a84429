#!/usr/bin/env bash
# libiscsi's conformance suite against the daemon, over a matrix of LU configurations.
#
# For each configuration below: build nothing new, serve a fresh 1 GiB sparse image with the
# configuration's options on a loopback port, run `iscsi-test-cu -V --dataloss` (both of its
# initiator names; on loopback the daemon admits every initiator), stop the daemon with SIGTERM
# (it must exit 0), and check the per-test verdicts against tests/conformance/NAME.expected
# (scripts/conformance/check.sh says how). Writes out/conformance/NAME/: results.txt (per-test
# verdicts), the raw iscsi-test-cu output (-V: every command sent and its outcome, so
# gzip-compressed: iscsi-test-cu.log.gz) and the daemon's log. The last line is the total over
# all configurations, "N passed, N failed, N skipped".
#
# What runs: the tests of `-t ALL` (or of the configuration's family), but not through `-t ALL`
# itself: scripts/conformance/select.awk writes the list (tests.txt) and says why. The tests in
# $isolated run after it, each in an iscsi-test-cu of its own (iscsi-test-cu.TEST.log.gz).
#
# Configurations:
#   512e       512-byte blocks, 4 KiB physical blocks (the default): the whole suite
#   512n       512-byte blocks, 512-byte physical blocks: the whole suite
#   4kn        4096-byte blocks: the whole suite
#   direct     the default LU with direct I/O (--direct: O_DIRECT, past the page cache): the
#              whole suite
#   multipath  the default LU reached over two sessions: the MultipathIO family (CAW and resets
#              across paths); on its own fresh image, as its COMPARE AND WRITE test assumes
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
out=$root/out/conformance
init1=iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-test
init2=iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-test-2
suite_timeout=1800
# Tests that run each in an iscsi-test-cu process of its own (scripts/conformance/select.awk).
isolated="iSCSITMF.LUNResetSimpleAsync"

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
iscsi-test-cu -l >"$out/test-list.txt"

total_pass=0 total_fail=0 total_skip=0 all_ok=1

# test_cu NAME TESTS LOG URL...: one iscsi-test-cu run of TESTS (a -t argument) into LOG.log
# and LOG.stderr.log.
test_cu() {
    local name=$1 tests=$2 log=$3 status=0
    shift 3
    # -V: some tests log their "[SKIPPED]" only at the verbose level (parse.awk).
    timeout --kill-after=10 "$suite_timeout" iscsi-test-cu -V --dataloss -t "$tests" \
        -i "$init1" -I "$init2" "$@" >"$log.log" 2>"$log.stderr.log" || status=$?
    # iscsi-test-cu exits non-zero when a test fails; only a time-out is an error of its own.
    if ((status == 124 || status == 137)); then
        echo "conformance[$name]: iscsi-test-cu -t $tests did not finish in ${suite_timeout}s" >&2
        all_ok=0
    fi
}

# run NAME PATHS SUITE SERVE-OPTIONS...: one configuration. PATHS is how many sessions to the
# LU iscsi-test-cu opens; SUITE is "" for the whole suite or one family.
run() {
    local name=$1 paths=$2 suite=$3
    shift 3
    local dir=$out/$name
    mkdir -p "$dir"
    # The image and its reservation sidecar (APTPL state): every configuration starts fresh.
    rm -f "$work/disk.img" "$work/disk.img.pr" "$work/daemon.out"
    # A control socket of its own: the default one is shared by every daemon on the machine.
    RUST_LOG=${RUST_LOG:-info} "$bin" serve --file "$work/disk.img" --size 1G \
        --listen 127.0.0.1:0 --control "$work/control.sock" "$@" \
        >"$work/daemon.out" 2>"$dir/daemon.log" &
    daemon=$!
    local url=""
    for _ in $(seq 300); do
        # The file appears only once the background shell has set up its redirection.
        url=$(head -n 1 "$work/daemon.out" 2>/dev/null || true)
        [[ $url == iscsi://* ]] && break
        kill -0 "$daemon" 2>/dev/null || break
        sleep 0.1
    done
    if [[ $url != iscsi://* ]]; then
        echo "conformance[$name]: the daemon printed no URL; its log:" >&2
        cat "$dir/daemon.log" >&2
        exit 1
    fi
    echo "conformance[$name]: testing $url (options: ${*:-none})"
    local urls=() logs=() test
    for _ in $(seq "$paths"); do urls+=("$url"); done
    awk -v only="$suite" -v isolated="$isolated" -f "$root/scripts/conformance/select.awk" \
        "$out/test-list.txt" >"$dir/tests.txt"
    test_cu "$name" "$dir/tests.txt" "$dir/iscsi-test-cu" "${urls[@]}"
    logs+=("$dir/iscsi-test-cu.log")
    for test in $isolated; do
        [[ -z $suite || ${test%%.*} == "$suite" ]] || continue
        test_cu "$name" "ALL.$test" "$dir/iscsi-test-cu.$test" "${urls[@]}"
        logs+=("$dir/iscsi-test-cu.$test.log")
    done

    if kill -TERM "$daemon" 2>/dev/null; then
        for _ in $(seq 300); do
            kill -0 "$daemon" 2>/dev/null || break
            sleep 0.1
        done
    fi
    if kill -0 "$daemon" 2>/dev/null; then
        echo "conformance[$name]: the daemon did not stop within 30 s of SIGTERM" >&2
        all_ok=0
    else
        local daemon_status=0
        wait "$daemon" || daemon_status=$?
        if ((daemon_status != 0)); then
            echo "conformance[$name]: the daemon exited with status $daemon_status; its log ends:" >&2
            tail -n 20 "$dir/daemon.log" >&2
            all_ok=0
        fi
    fi
    daemon=""

    awk -v only="$suite" -f "$root/scripts/conformance/parse.awk" "$out/test-list.txt" \
        "${logs[@]}" >"$dir/results.txt"
    gzip -9 "${logs[@]}"
    local check=0
    "$root/scripts/conformance/check.sh" "$dir/results.txt" \
        "$root/tests/conformance/$name.expected" >"$dir/check.txt" || check=$?
    sed "s/^/conformance[$name]: /" "$dir/check.txt"
    ((check == 0)) || all_ok=0
    local p f s
    read -r p _ f _ s _ < <(tail -n 1 "$dir/check.txt")
    total_pass=$((total_pass + p)) total_fail=$((total_fail + f)) total_skip=$((total_skip + s))
}

run 512e 1 ""
run 512n 1 "" --physical-block-size 512
run 4kn 1 "" --block-size 4096
run direct 1 "" --direct
run multipath 2 MultipathIO

if ((all_ok)); then
    echo "conformance: ok"
else
    echo "conformance: FAILED"
fi
echo "$total_pass passed, $total_fail failed, $total_skip skipped"
((all_ok))
