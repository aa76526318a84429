#!/usr/bin/env bash
# The cost of the per-command reservation check: IOPS of one sharedisk LU with no reservation,
# and with a persistent reservation that the benchmark's initiator must pass as a registrant.
#
#   bench/reservations.sh       # BENCH_SECONDS (default 10) per run, BENCH_ROUNDS (default 3)
#
# One daemon, one image (filled with data first), neutral clients: iscsi-perf (random 4 KiB
# reads, 32 in flight) and qemu-img bench (4 KiB writes, 32 in flight), both logging in as
# $init. "held": another initiator (the pr_hold example) registers itself and, with
# SPEC_I_PT, every I_T nexus of $init, then reserves Write Exclusive – Registrants Only; every
# command of the benchmark then takes the check's registered-nexus path. "none": `sharedisk pr
# clear` removed all of it. Runs alternate none/held, BENCH_ROUNDS times (default 5); the table
# shows the median IOPS of each and the median of the rounds' held/none. Needs root to install
# packages when they are missing. Not part of scripts/test.sh.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
secs=${BENCH_SECONDS:-10}
rounds=${BENCH_ROUNDS:-5}
size_mib=${BENCH_SIZE_MIB:-1024}
out=$root/out/bench-reservations
iqn=iqn.2026-01.io.sharedisk:wire
init=iqn.2026-01.io.sharedisk:bench

# shellcheck source=bench/install.sh
source "$root/bench/install.sh"

cargo build --release --locked -p sharedisk --manifest-path "$root/Cargo.toml"
cargo build --release --locked -p sharedisk --example pr_hold --manifest-path "$root/Cargo.toml"
bin=${CARGO_TARGET_DIR:-$root/target}/release/sharedisk
hold=${CARGO_TARGET_DIR:-$root/target}/release/examples/pr_hold

mkdir -p "$out"
work=$(mktemp -d /var/tmp/sharedisk-bench.XXXXXX)
image=$work/disk.img
control=$work/control.sock
server=""
holder=""
cleanup() {
    [[ -n $holder ]] && kill "$holder" 2>/dev/null || true
    if [[ -n $server ]]; then
        kill -TERM "$server" 2>/dev/null || true
        wait "$server" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

fio --name=fill --filename="$image" --rw=write --bs=1M --size="${size_mib}M" \
    --ioengine=psync --end_fsync=1 >"$out/fill.log"

start_sharedisk --name "$iqn" --control "$control"
portal=${url#iscsi://}
portal=${portal%%/*}

# Each run prints its IOPS.
perf_read() { # LOG
    timeout $((secs + 30)) iscsi-perf -i "$init" -t "$secs" -m 32 -b 8 -r "$url" >"$1" 2>&1 || true
    tr '\r' '\n' <"$1" | sed -n 's/^iops average \([0-9]*\).*/\1/p' | tail -n 1
}
count=$((secs * 80000))
qemu_write() { # LOG [INITIATOR [COUNT]]
    local opts="driver=iscsi,transport=tcp,portal=$portal,target=$iqn,lun=0"
    opts+=",initiator-name=${2:-$init}"
    timeout $((secs * 10 + 60)) qemu-img bench --image-opts "$opts" -c "${3:-$count}" -d 32 \
        -s 4096 -w >"$1" 2>&1 || true
    sed -n 's/^Run completed in \([0-9.]*\) seconds.*/\1/p' "$1" |
        awk -v c="$count" '{ printf "%d\n", c / $1 }'
}

# vals[MODE,ROW] = the IOPS of each round, space-separated.
declare -A vals
for r in $(seq "$rounds"); do
    for mode in none held; do
        if [[ $mode == held ]]; then
            coproc HOLD { "$hold" "$portal" "$init"; }
            holder=$HOLD_PID
            read -r line <&"${HOLD[0]}"
            [[ $line == held ]] || { echo "bench: pr_hold failed" >&2; exit 1; }
            "$bin" pr show --control "$control" >"$out/state-$r.txt"
            # The reservation is real: an initiator that is not registered cannot write.
            if [[ -n $(qemu_write "$out/unregistered-$r.log" iqn.2026-01.io.sharedisk:other 64) ]]; then
                echo "bench: an unregistered initiator could write under the reservation" >&2
                exit 1
            fi
        fi
        for row in read write; do
            log=$out/$mode-$row-$r.log
            if [[ $row == read ]]; then v=$(perf_read "$log"); else v=$(qemu_write "$log"); fi
            [[ -n $v ]] || { echo "bench: no result in $log" >&2; exit 1; }
            echo "bench: round $r $mode $row: $v IOPS"
            vals[$mode,$row]+="$v "
        done
        if [[ $mode == held ]]; then
            exec {HOLD[1]}>&-
            wait "$holder" 2>/dev/null || true
            holder=""
            "$bin" pr clear "$iqn/0" --control "$control" >/dev/null
        fi
    done
done

# Each round's none and held runs are back to back, so the ratio of a round is the least
# disturbed by whatever else the machine does; the table shows the median of those.
{
    echo "sharedisk IOPS with and without a persistent reservation: 4 KiB, QD32, ${secs} s x" \
        "$rounds rounds, $(nproc) cores"
    printf '%-22s %12s %12s %18s\n' row "none (median)" "held (median)" "held/none (median)"
    for row in read write; do
        name=$([[ $row == read ]] && echo "iscsi-perf randread" || echo "qemu-img write")
        awk -v name="$name" -v none="${vals[none,$row]}" -v held="${vals[held,$row]}" '
            function median(a, n,   i, j, t) {
                for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++)
                    if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t }
                return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
            }
            BEGIN {
                n = split(none, a, " "); split(held, b, " ")
                for (i = 1; i <= n; i++) { r[i] = b[i] / a[i]; x[i] = a[i]; y[i] = b[i] }
                printf "%-22s %12d %12d %18.3f\n", name, median(x, n), median(y, n), median(r, n)
            }'
    done
} | tee "$out/table.txt"
