#!/usr/bin/env bash
# sharedisk against tgt, side by side on this machine, with neutral clients; fio on the image
# file itself is the ceiling.
#
#   bench/iscsi.sh                    # about 15 s per row and server, one round
#   BENCH_SECONDS=10 BENCH_ROUNDS=3 bench/iscsi.sh
#   BENCH_DIRECT=1 bench/iscsi.sh
#
# Rows (4 KiB I/O):
#   iscsi-perf   random reads, 32 in flight              (libiscsi-bin)
#   qemu-img     reads and writes, 1 and 32 in flight    (qemu-img bench over iscsi://,
#                                                         QEMU's own iSCSI client)
# sharedisk and tgt (tgtd, file-backed LUN on the same image) both serve the image for the
# whole run, and each row runs against one, then the other, back to back, in an order that
# alternates from round to round; only one of them has a client at a time. This machine's
# speed drifts by more than the differences measured, and a row of each server run minutes
# apart would compare two machines. The table gives the median of BENCH_ROUNDS rounds (1 by
# default) per row and server, and as sd/tgt the median of the rounds' own ratios; every
# round's figures are kept in out/bench/rounds.txt.
# fio straight on the file with the same pattern (the better of io_uring at the row's depth
# and psync) runs once first. All of them with the same cache:
#   buffered (the default)  through the host's page cache, which is reset (written back,
#                           dropped, read in full with readahead off: reset_page_cache in
#                           bench/install.sh) before each run of a row (fio with
#                           --invalidate=0: by default fio drops the file's cached pages
#                           first, and its reads would then measure the disk while the
#                           targets' reads come from memory)
#   BENCH_DIRECT=1          direct I/O for all three (sharedisk --direct, tgt --bsoflags
#                           direct, fio --direct=1): the ceiling is then the device's, which is
#                           what "fio on the file" means for a target in front of a real disk
# Everything listens on 127.0.0.1 only and is stopped on exit.
# Prints a table of IOPS with the ratios sharedisk/tgt and sharedisk/fio, then for
# every row the client's own CPU time per request against sharedisk (bash's `time` around
# iscsi-perf or qemu-img, each of which runs its requests on one thread; for qemu-img less
# what its start and login cost): 1e6 over it is an IOPS that client cannot exceed while its
# cost per request stays the same, and that bound over tgt's (fio's) IOPS the highest sd/tgt
# (sd/fio) sharedisk could show on the row on this machine, however fast it answered. The
# raw output is kept in out/bench/. Needs root to install packages when they are missing. Not
# part of scripts/test.sh.
#
# QEMU's iSCSI driver is in qemu-block-extra, which Debian 12 ships only for its own QEMU 7.2:
# when the installed qemu-img is a newer one without that driver, this installs qemu-utils 7.2
# from bookworm with it (a downgrade of qemu-img).
set -euo pipefail
# bash's `time` prints seconds with the locale's decimal point; awk reads a dot.
export LC_ALL=C

root=$(cd "$(dirname "$0")/.." && pwd)
secs=${BENCH_SECONDS:-15}
size_mib=${BENCH_SIZE_MIB:-1024}
direct=${BENCH_DIRECT:-0}
rounds=${BENCH_ROUNDS:-1}
out=$root/out/bench
iqn_tgt=iqn.2026-01.io.sharedisk:bench-tgt
tgt_port=3270
tgt_ctl=17

# shellcheck source=bench/install.sh
source "$root/bench/install.sh"

cargo build --release --locked -p sharedisk --manifest-path "$root/Cargo.toml"
bin=${CARGO_TARGET_DIR:-$root/target}/release/sharedisk

mkdir -p "$out"
work=$(mktemp -d /var/tmp/sharedisk-bench.XXXXXX)
image=$work/disk.img
server=""
tgt_pid=""
cleanup() {
    if [[ -n $server ]]; then
        kill -TERM "$server" 2>/dev/null || true
        wait "$server" 2>/dev/null || true
    fi
    if [[ -n $tgt_pid ]]; then
        # tgtd ignores SIGTERM; it stops when told to, once it has no target.
        tgtadm -C "$tgt_ctl" --lld iscsi --op delete --mode target --tid 1 --force \
            >/dev/null 2>&1 || true
        tgtadm -C "$tgt_ctl" --op delete --mode system >/dev/null 2>&1 || true
        for _ in $(seq 50); do
            kill -0 "$tgt_pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$tgt_pid" 2>/dev/null || true
        wait "$tgt_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

# Real data everywhere, so no row reads holes.
fio --name=fill --filename="$image" --rw=write --bs=1M --size="${size_mib}M" \
    --ioengine=psync --end_fsync=1 >"$out/fill.log"

# Buffered runs start with the whole image in the page cache, in the same state for every
# server (see reset_page_cache).
warm() {
    ((direct)) || reset_page_cache "$image"
}

# Results: results[ROW,SERVER,ROUND] = IOPS; fio's are results[ROW,fio].
declare -A results counts client_us sizing_cpu
rows=(perf-randread-qd32 qemu-read-qd1 qemu-read-qd32 qemu-write-qd1 qemu-write-qd32)

# iscsi-perf prints "iops average N" when its time is up.
# Its CPU time (bash's `time`, as for qemu-img below) over the requests of its whole run (the
# average times the run's elapsed time, its login included: if anything, more requests than
# it made) gives client_us.
run_perf() { # NAME URL ROUND
    local log=$out/$1-perf-randread-qd32-r$3.log TIMEFORMAT='%R %U %S' iops
    { time timeout $((secs + 30)) iscsi-perf -t "$secs" -m 32 -b 8 -r "$2" >"$log" 2>&1; } \
        2>"$log.cpu" || true
    iops=$(tr '\r' '\n' <"$log" | sed -n 's/^iops average \([0-9]*\).*/\1/p' | tail -n 1)
    results[perf-randread-qd32,$1,$3]=$iops
    [[ -n $iops && $iops != 0 ]] || return 0
    client_us[perf-randread-qd32,$1,$3]=$(awk -v i="$iops" \
        '{ if ($1 > 0) printf "%.1f", ($2 + $3) * 1e6 / (i * $1) }' "$log.cpu")
}

# qemu-img bench runs a count of requests; a short first run sizes the count for ~secs seconds
# (sequential 4 KiB, at most the whole image), once per row and server.
# qemu-img's own CPU time (user + system, bash's `time`) goes to LOG.cpu.
qemu_bench() { # COUNT DEPTH RW URL LOG -> seconds
    local flag=() TIMEFORMAT='%U %S'
    [[ $3 == write ]] && flag=(-w)
    { time timeout 120 qemu-img bench -f raw -c "$1" -d "$2" -s 4096 "${flag[@]}" "$4" \
        >"$5" 2>&1; } 2>"$5.cpu" || true
    sed -n 's/^Run completed in \([0-9.]*\) seconds.*/\1/p' "$5"
}
run_qemu() { # NAME URL ROW ROUND
    local rw=${3#qemu-} depth t count max=$((size_mib * 256))
    local log=$out/$1-$3-r$4.log
    depth=${rw#*-qd} rw=${rw%-qd*}
    count=${counts[$3,$1]:-}
    if [[ -z $count ]]; then
        t=$(qemu_bench 2000 "$depth" "$rw" "$2" "$log")
        [[ -n $t ]] || return 0
        count=$(awk -v t="$t" -v s="$secs" -v m="$max" \
            'BEGIN { c = int(2000 / (t > 0 ? t : 0.001) * s); print (c > m ? m : c) }')
        counts[$3,$1]=$count
        sizing_cpu[$3,$1]=$(awk '{ print $1 + $2 }' "$log.cpu")
        # The measured run starts from the same page cache as every other (the sizing run
        # wrote some).
        warm
    fi
    t=$(qemu_bench "$count" "$depth" "$rw" "$2" "$log")
    [[ -n $t ]] || return 0
    results[$3,$1,$4]=$(awk -v c="$count" -v t="$t" 'BEGIN { printf "%d", c / t }')
    # Microseconds of qemu-img's CPU per request, what its start, login and logout cost
    # taken out: the sizing run's CPU (2000 requests) subtracted, over the requests beyond
    # those. qemu-img runs its requests on one thread (see the table).
    ((count > 2000)) || return 0
    client_us[$3,$1,$4]=$(awk -v c="$count" -v s="${sizing_cpu[$3,$1]}" \
        '{ u = ($1 + $2 - s) * 1e6 / (c - 2000); if (u > 0) printf "%.1f", u }' "$log.cpu")
}

# The ceiling of a row is the better of two engines: io_uring at the row's depth, and psync
# (one pread/pwrite at a time). On a buffered file io_uring hands each write to a kernel worker
# thread, which makes it the slower of the two at depth 1; a ceiling that slow would flatter
# the targets. Each engine runs every row from a reset page cache, as each target does.
run_fio() {
    local row rw depth engine iops
    for engine in io_uring psync; do
        for row in "${rows[@]}"; do
            warm
            case $row in
                perf-randread-qd32) rw=randread depth=32 ;;
                qemu-*) rw=${row#qemu-} depth=${rw#*-qd} rw=${rw%-qd*} ;;
            esac
            # psync has one request in flight whatever the depth (fio says so on stdout).
            [[ $engine == psync ]] && depth=1
            fio --name="$row" --filename="$image" --rw="$rw" --bs=4k --iodepth="$depth" \
                --ioengine="$engine" --direct="$direct" --invalidate=0 --size="${size_mib}M" \
                --time_based --runtime="$secs" --output-format=json \
                >"$out/fio-$row-$engine.json"
            iops=$(python3 -c '
import json, sys
job = json.load(open(sys.argv[1]))["jobs"][0]
print(int(job["read"]["iops"] + job["write"]["iops"]))' "$out/fio-$row-$engine.json")
            echo "bench: fio $row $engine: $iops IOPS"
            if ((iops > ${results[$row,fio]:-0})); then
                results[$row,fio]=$iops
            fi
        done
    done
}

echo "bench: fio on the file"
run_fio

echo "bench: starting sharedisk and tgt"
sd_opts=()
((direct)) && sd_opts=(--direct)
start_sharedisk "${sd_opts[@]}"
sd_url=$url

if tgtadm -C "$tgt_ctl" --op show --mode system >/dev/null 2>&1; then
    echo "bench: another tgtd already uses control port $tgt_ctl" >&2
    exit 1
fi
tgtd -f -C "$tgt_ctl" --iscsi portal="127.0.0.1:$tgt_port" >"$out/tgtd.log" 2>&1 &
tgt_pid=$!
for _ in $(seq 100); do
    tgtadm -C "$tgt_ctl" --op show --mode system >/dev/null 2>&1 && break
    sleep 0.1
done
tgtadm -C "$tgt_ctl" --lld iscsi --op new --mode target --tid 1 -T "$iqn_tgt"
tgt_opts=()
((direct)) && tgt_opts=(--bsoflags direct)
tgtadm -C "$tgt_ctl" --lld iscsi --op new --mode logicalunit --tid 1 --lun 1 -b "$image" \
    "${tgt_opts[@]}"
tgtadm -C "$tgt_ctl" --lld iscsi --op bind --mode target --tid 1 -I ALL
tgt_url=iscsi://127.0.0.1:$tgt_port/$iqn_tgt/1

# Each row, each server, from the same page-cache state.
declare -A urls=([sharedisk]=$sd_url [tgt]=$tgt_url)
for ((r = 1; r <= rounds; r++)); do
    order=(sharedisk tgt)
    ((r % 2 == 0)) && order=(tgt sharedisk)
    for row in "${rows[@]}"; do
        for name in "${order[@]}"; do
            warm
            if [[ $row == perf-* ]]; then
                run_perf "$name" "${urls[$name]}" "$r"
            else
                run_qemu "$name" "${urls[$name]}" "$row" "$r"
            fi
            echo "bench: round $r $row $name: ${results[$row,$name,$r]:-failed} IOPS"
        done
    done
done

# lower_middle: the median of the numbers on stdin (the lower middle one of an even count),
# or nothing.
lower_middle() {
    sort -g | awk '{ v[NR] = $1 } END { if (NR) print v[int((NR + 1) / 2)] }'
}

# median_of ARRAY ROW SERVER: the median of the rounds that gave a figure in ARRAY.
median_of() {
    local -n figures=$1
    local r
    for ((r = 1; r <= rounds; r++)); do
        if [[ -n ${figures[$2,$3,$r]:-} ]]; then
            echo "${figures[$2,$3,$r]}"
        fi
    done | lower_middle
}

# median ROW SERVER: the median IOPS of the rounds that gave a figure.
median() { median_of results "$1" "$2"; }

# median_ratio ROW: the median of the rounds' sharedisk/tgt ratios (each round's two runs
# are back to back, so a round's ratio is free of the drift between rounds).
median_ratio() {
    local r sd tg
    for ((r = 1; r <= rounds; r++)); do
        sd=${results[$1,sharedisk,$r]:-}
        tg=${results[$1,tgt,$r]:-}
        if [[ -n $sd && -n $tg && $tg != 0 ]]; then
            awk -v a="$sd" -v b="$tg" 'BEGIN { printf "%.2f\n", a / b }'
        fi
    done | lower_middle
}

ratio() {
    if [[ -n $1 && -n $2 && $2 != 0 ]]; then
        awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'
    else
        echo "-"
    fi
}
{
    echo "sharedisk vs tgt vs fio on the file: 4 KiB I/O, ${secs} s per row, median of" \
        "$rounds round(s) (sd/tgt: the median of the rounds' ratios), ${size_mib} MiB image," \
        "$( ((direct)) && echo "direct I/O" || echo "page cache warm"), $(nproc) cores"
    printf '%-22s %10s %10s %10s %9s %9s\n' row sharedisk tgt fio sd/tgt sd/fio
    for row in "${rows[@]}"; do
        sd=$(median "$row" sharedisk)
        tg=$(median "$row" tgt)
        fi=${results[$row,fio]:-}
        rt=$(median_ratio "$row")
        printf '%-22s %10s %10s %10s %9s %9s\n' "$row" "${sd:--}" "${tg:--}" "${fi:--}" \
            "${rt:--}" "$(ratio "$sd" "$fi")"
    done

    # The client's own cost: a client on one thread (iscsi-perf, qemu-img) cannot go beyond
    # 1e6 / its CPU microseconds per request. That cost is the client's with sharedisk's
    # answers as they are (how many PDUs a response takes, how many arrive per read); with
    # it, "bound/tgt" is the highest sd/tgt and "bound/fio" the highest sd/fio sharedisk could
    # reach on the row here, however little time it took itself.
    echo
    echo "the client's own CPU per request (us, median of rounds), the IOPS that bounds," \
        "and that bound over tgt's and fio's IOPS"
    printf '%-22s %10s %10s %10s %9s %9s\n' row "us(sd)" "us(tgt)" bound bound/tgt bound/fio
    for row in "${rows[@]}"; do
        cs=$(median_of client_us "$row" sharedisk)
        ct=$(median_of client_us "$row" tgt)
        bound=$(awk -v u="${cs:-0}" 'BEGIN { if (u > 0) printf "%d", 1e6 / u }')
        printf '%-22s %10s %10s %10s %9s %9s\n' "$row" "${cs:--}" "${ct:--}" "${bound:--}" \
            "$(ratio "$bound" "$(median "$row" tgt)")" "$(ratio "$bound" "${results[$row,fio]:-}")"
    done
} | tee "$out/table.txt"

# Every round, with its own ratio: how far one round is from another.
{
    printf '%-22s %6s %10s %10s %9s\n' row round sharedisk tgt sd/tgt
    for row in "${rows[@]}"; do
        for ((r = 1; r <= rounds; r++)); do
            sd=${results[$row,sharedisk,$r]:-}
            tg=${results[$row,tgt,$r]:-}
            printf '%-22s %6s %10s %10s %9s\n' "$row" "$r" "${sd:--}" "${tg:--}" \
                "$(ratio "$sd" "$tg")"
        done
    done
} >"$out/rounds.txt"
echo "bench: every round's figures: $out/rounds.txt"
