#!/usr/bin/env bash
# sharedisk's vhost-user-scsi frontend against QEMU's own virtio-scsi + scsi-hd and against
# vhost-device-scsi, seen from a real Linux guest: the same fio rows run in the same guest
# (scripts/guest/, QEMU TCG) against each target, one target at a time, on one image.
#
#   bench/vhost.sh            # BENCH_SECONDS=20 per row (+ BENCH_RAMP=3); about 10 minutes
#   BENCH_SECONDS=5 bench/vhost.sh          # a short run, to try it
#
# Targets (columns), each a fresh guest booted on the same image, which is filled with data
# first (no holes):
#   sharedisk            sharedisk serve --vhost-user SOCK --vhost-queues Q; vhost-user-scsi-pci
#                        with num_queues=Q
#   scsi-hd threads      QEMU's virtio-scsi-pci (num_queues=Q) + scsi-hd, aio=threads
#   scsi-hd io_uring     the same, aio=io_uring
#   vhost-device-scsi    the rust-vmm peer (cargo install vhost-device-scsi); it serves one
#                        request queue, so its device has num_queues=1,param_change=off
#   scsi-hd-null         not a contender: QEMU's virtio-scsi + scsi-hd over QEMU's null-co
#                        driver (no storage behind it: reads return zeros, writes are dropped),
#                        num_queues=Q: what the guest and QEMU's own device reach when storage
#                        costs nothing. A measure of the guest's limits on this machine, not a
#                        bound for vhost-user back ends (they take work off QEMU's threads)
# Rows (4 KiB random I/O on the raw /dev/sdX, direct=1, time-based, guest fio):
#   randread-qd1, randwrite-qd1           one job, iodepth 1
#   randread-qd16, randwrite-qd16         one job per vCPU (pinned, so each submits on its own
#                                         request queue), 16 in flight in all
#   randread-qd1-1k                       one job, iodepth 1, at most 1000 requests a second:
#                                         not a race (every target keeps up), only for the
#                                         tables of CPU below
# For the two vhost-user back ends (sharedisk, vhost-device-scsi) a second table gives the CPU
# the back-end process used through each row (user + system, all its threads, from
# /proc/PID/stat at the console lines just before and after the row's fio run, so its start
# and ramp count), as a share of one host core and per request (that share over the row's
# IOPS).
# A third table gives, for every target, what each request cost the guest: the interrupts of
# its request queues, and the µs its vCPUs were busy (both counted in the guest around the
# row's fio run, ramp included, over the requests its disk completed meanwhile; guest.tsv).
# TCG reports no steal time: a vCPU the host preempts still counts as busy, so a back end
# that takes host CPU from the vCPUs raises the busy figure too. The interrupts are exact. At
# the paced row the busy figure is mostly fio's pacing and the idle guest, not the requests.
# A fourth table gives, for every target, the share of the host's CPU time the hypervisor
# under this machine took (steal, from /proc/stat, over the same span as the back end's CPU):
# a guest that ran slow in one round while the host was stolen from is the host's noise, not
# its target's (steal.tsv has every round).
# The targets run in the order given in odd rounds and in the reverse order in even ones, so
# that (with BENCH_ROUNDS of 2 or more) no target always runs first in a round or always
# follows the same one.
# Every guest has the same vCPUs and memory; scsi-hd uses the host page cache like the two
# vhost-user back ends (cache=writeback; BENCH_SCSI_HD_CACHE=none for O_DIRECT).
# Before each target the image's page cache is reset: written back, dropped, read once with
# readahead off (bench/install.sh reset_page_cache).
#
# Under TCG the guest's CPU emulation dominates every number: compare the ratios, not the IOPS.
# Prints a table of IOPS (median of BENCH_ROUNDS rounds) with the ratios sharedisk/scsi-hd
# (the better of the two aio modes) and sharedisk/vhost-device-scsi, and whether the targets
# are met (at least scsi-hd on every row, at least 1.5x vhost-device-scsi at QD16). The raw
# output (guest consoles with fio's JSON, results channels, QEMU command lines, back-end logs,
# results.tsv with every round's IOPS, cpu.tsv, guest.tsv, steal.tsv, table.txt) is kept in
# out/bench-vhost/. Exits 1 when something failed (a row, a guest, a back end; listed under
# the table). Needs root to install packages when they are missing. Not part of
# scripts/test.sh.
#
# Knobs: BENCH_SECONDS (20), BENCH_RAMP (3), BENCH_ROUNDS (1), BENCH_VCPUS (2), BENCH_QUEUES
# (= vCPUs), BENCH_MEM (1G), BENCH_SIZE_MIB (1024), BENCH_IOENGINE (io_uring, which the guest
# kernel has; or libaio), BENCH_SCSI_HD_CACHE (writeback), BENCH_TARGETS (all five:
# sharedisk scsi-hd-threads scsi-hd-io_uring vhost-device-scsi scsi-hd-null), SHAREDISK_BIN (default:
# the release build).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
secs=${BENCH_SECONDS:-20}
ramp=${BENCH_RAMP:-3}
rounds=${BENCH_ROUNDS:-1}
vcpus=${BENCH_VCPUS:-2}
queues=${BENCH_QUEUES:-$vcpus}
mem=${BENCH_MEM:-1G}
size_mib=${BENCH_SIZE_MIB:-1024}
ioengine=${BENCH_IOENGINE:-io_uring}
hd_cache=${BENCH_SCSI_HD_CACHE:-writeback}
# Every target, in the tables' order.
all_targets=(sharedisk scsi-hd-threads scsi-hd-io_uring vhost-device-scsi scsi-hd-null)
read -ra targets <<<"${BENCH_TARGETS:-${all_targets[*]}}"
out=$root/out/bench-vhost
guest_dir=$root/scripts/guest
for t in "${targets[@]}"; do
    case $t in
    sharedisk | scsi-hd-threads | scsi-hd-io_uring | vhost-device-scsi | scsi-hd-null) ;;
    *) echo "bench: unknown target $t in BENCH_TARGETS" >&2; exit 2 ;;
    esac
done

# Rows: NAME:RW:IODEPTH:JOBS (see cases/bench.sh); QD16 is 16 in flight over one job per vCPU.
qd16_jobs=$vcpus
((16 % qd16_jobs == 0)) || qd16_jobs=1
qd16_depth=$((16 / qd16_jobs))
rows=(randread-qd1 randwrite-qd1 randread-qd16 randwrite-qd16)
row_specs="randread-qd1:randread:1:1 randwrite-qd1:randwrite:1:1"
row_specs+=" randread-qd16:randread:$qd16_depth:$qd16_jobs randwrite-qd16:randwrite:$qd16_depth:$qd16_jobs"
# Rows that are no race, only measured for the back ends' CPU.
paced=(randread-qd1-1k)
row_specs+=" randread-qd1-1k:randread:1:1:1000"
all_rows=("${rows[@]}" "${paced[@]}")
# Boot, then each row's ramp and run, with room for TCG's slowness.
guest_timeout=$((180 + ${#all_rows[@]} * (secs + ramp) * 2))

bench_needs=vhost
# shellcheck source=bench/install.sh
source "$root/bench/install.sh"

if [[ -z ${SHAREDISK_BIN:-} ]]; then
    cargo build --release --locked -p sharedisk --bin sharedisk --manifest-path "$root/Cargo.toml"
fi
bin=${SHAREDISK_BIN:-${CARGO_TARGET_DIR:-$root/target}/release/sharedisk}
guest=$("$guest_dir/build.sh")

rm -rf "$out"
mkdir -p "$out"
printf 'round\ttarget\trow\tiops\n' >"$out/results.tsv"
printf 'round\ttarget\trow\tcpu_percent\n' >"$out/cpu.tsv"
printf 'round\ttarget\trow\tios\tirqs\tbusy_ticks\n' >"$out/guest.tsv"
printf 'round\ttarget\trow\tsteal_percent\n' >"$out/steal.tsv"
work=$(mktemp -d /var/tmp/sharedisk-bench-vhost.XXXXXX)
image=$work/disk.img
sock=$work/vhost.sock
server=""
guest_pid=""
cleanup() {
    local f
    # The guest's run.sh: started in the background, it ignores SIGINT, and its QEMU's pid
    # file is written only once its initramfs is built.
    [[ -z $guest_pid ]] || kill -TERM "$guest_pid" 2>/dev/null || true
    # A guest still running (an interrupted run): run.sh's timeout passes SIGTERM on to QEMU.
    for f in "$out"/*.pid; do
        [[ -f $f ]] && kill -TERM "$(cat "$f")" 2>/dev/null || true
    done
    if [[ -n $server ]]; then
        kill -TERM "$server" 2>/dev/null || true
        wait "$server" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

echo "bench: filling a ${size_mib} MiB image"
fio --name=fill --filename="$image" --rw=write --bs=1M --size="${size_mib}M" \
    --ioengine=psync --end_fsync=1 >"$out/fill.log"

# wait_for_socket PID: the back end's socket appears, or the back end is gone.
wait_for_socket() {
    local i
    for ((i = 0; i < 300; i++)); do
        [[ -S $sock ]] && return 0
        kill -0 "$1" 2>/dev/null || return 1
        sleep 0.1
    done
    return 1
}

# start_backend TARGET LOG: the vhost-user back end of TARGET on $sock (sets server).
start_backend() {
    rm -f "$sock"
    case $1 in
    sharedisk)
        "$bin" serve --file "$image" --listen 127.0.0.1:0 --vhost-user "$sock" \
            --vhost-queues "$queues" --control "$work/control.sock" >"$2.out" 2>"$2" &
        ;;
    vhost-device-scsi)
        vhost-device-scsi --socket-path "$sock" "$image" >"$2" 2>&1 &
        ;;
    esac
    server=$!
    wait_for_socket "$server"
}

stop_backend() {
    [[ -n $server ]] || return 0
    kill -TERM "$server" 2>/dev/null || true
    wait "$server" 2>/dev/null || true
    server=""
}

# row_watch GUEST CONSOLE FILE [BACKEND]: while the process GUEST lives, each time CONSOLE
# gets a "[guest] fio ROW: ..." or "[guest] fio ROW end" line (ROW's fio run begins or ends),
# append "start|end ROW TICKS SECONDS STEAL TOTAL" to FILE: the CPU time BACKEND has used so
# far (user + system, all threads, in clock ticks; 0 without a BACKEND), the time, and the
# host's stolen and total CPU time so far (the "cpu" line of /proc/stat: user to steal, in
# clock ticks). It follows the console with tail -F, which here looks at the file every 50 ms
# (it fell back to its default of a second, which put a row's bounds up to a second late).
row_watch() {
    local guest=$1 console=$2 file=$3 backend=${4:-} st f kind line ticks
    while read -r _ _ line; do
        line=${line%$'\r'} # the serial console ends lines with CR LF
        case $line in
        *:*) kind=start line=${line%%:*} ;;
        *" end") kind=end line=${line% end} ;;
        *) continue ;;
        esac
        ticks=0
        if [[ -n $backend ]]; then
            st=$(cat "/proc/$backend/stat" 2>/dev/null) || continue
            # utime and stime are fields 14 and 15; the name in field 2 ends with ") ".
            read -r -a f <<<"${st##*) }"
            ticks=$((f[11] + f[12]))
        fi
        # "cpu user nice system idle iowait irq softirq steal guest guest_nice": guest time
        # is already in user and nice.
        read -r -a f </proc/stat
        echo "$kind $line $ticks $(date +%s.%N) ${f[8]} $((f[1] + f[2] + f[3] + f[4] + f[5] + f[6] + f[7] + f[8]))" >>"$file"
    done < <(tail -n +1 -F -s 0.05 --pid="$guest" "$console" 2>/dev/null | grep --line-buffered '^\[guest\] fio ')
}

# Results: results[ROW,TARGET] = IOPS of each round, space-separated; cpu[ROW,TARGET] the
# back end's CPU percentages likewise; irq_req and busy_req[ROW,TARGET] the guest's
# interrupts and busy vCPU µs per request likewise; steal[ROW,TARGET] the host's stolen
# percentages likewise; failures: lines.
declare -A results cpu irq_req busy_req steal
failures=()

# run_target ROUND TARGET: one guest against TARGET; collects its rows.
run_target() {
    local round=$1 target=$2 name=r$1-$2 disk rc=0
    case $target in
    sharedisk) disk=vhost-user:$sock,num_queues=$queues ;;
    scsi-hd-threads) disk=scsi-hd:$image,aio=threads,cache=$hd_cache,num_queues=$queues ;;
    scsi-hd-io_uring) disk=scsi-hd:$image,aio=io_uring,cache=$hd_cache,num_queues=$queues ;;
    vhost-device-scsi) disk=vhost-user:$sock,num_queues=1,param_change=off ;;
    scsi-hd-null) disk=null:$((size_mib << 20)),num_queues=$queues ;;
    *) echo "bench: unknown target $target" >&2; exit 2 ;;
    esac
    echo "bench: round $round, $target"
    reset_page_cache "$image"
    if [[ $target == sharedisk || $target == vhost-device-scsi ]]; then
        if ! start_backend "$target" "$out/$name.backend.log"; then
            failures+=("$target (round $round): the back end did not start; see $out/$name.backend.log")
            stop_backend
            return
        fi
    fi
    "$guest_dir/run.sh" --guest "$guest" --dir "$out" --name "$name" --timeout "$guest_timeout" \
        --smp "$vcpus" --mem "$mem" --script "$guest_dir/cases/bench.sh" --disk "$disk" \
        --env BENCH_ROWS="$row_specs" --env BENCH_SECONDS="$secs" --env BENCH_RAMP="$ramp" \
        --env BENCH_IOENGINE="$ioengine" 2>>"$out/run.log" &
    guest_pid=$!
    local server_was=$server
    row_watch "$guest_pid" "$out/$name.console" "$out/$name.cpu" "$server" &
    local watcher=$!
    wait "$guest_pid" || rc=$?
    guest_pid=""
    # sharedisk keeps serving after the guest goes (vhost-device-scsi exits when its one
    # front end disconnects, as it is meant to).
    if [[ $target == sharedisk ]] && ! kill -0 "$server" 2>/dev/null; then
        failures+=("$target (round $round): the daemon exited during the run; see $out/$name.backend.log")
    fi
    stop_backend
    wait "$watcher" 2>/dev/null || true
    rm -f "$out/$name.initrd" # the base initramfs and $name.test.cpio.gz, 38 MB
    ((rc != 124)) || failures+=("$target (round $round): the guest timed out after ${guest_timeout}s")
    local f=$out/$name.results row v line want=$queues ios irqs busy irq_io busy_io
    [[ $target != vhost-device-scsi ]] || want=1
    v=$(awk '$1 == "VALUE" && $2 == "hw-queues" { print $3; exit }' "$f" 2>/dev/null || true)
    [[ -z $v || $v == "$want" ]] ||
        failures+=("$target (round $round): the guest has $v request queues, not $want")
    local -A measured=()
    for row in "${all_rows[@]}"; do
        v=$(awk -v n="iops-$row" '$1 == "VALUE" && $2 == n { print $3; exit }' "$f" 2>/dev/null || true)
        [[ -n $v ]] || continue
        measured[$row]=1
        results[$row,$target]+="$v "
        printf '%s\t%s\t%s\t%s\n' "$round" "$target" "$row" "$v" >>"$out/results.tsv"
        # What each request cost the guest: interrupts, and µs of busy vCPU time (ticks are
        # 10 ms), over the requests completed through the same fio run: "IOS IRQS BUSY
        # IRQS/IO BUSY-µs/IO", IRQS "-" when the guest found no interrupt line of the queues.
        read -r ios irqs busy irq_io busy_io < <(awk -v r="$row" '$1 == "VALUE" { v[$2] = $3 }
            END {
                n = v["ios-" r] + 0; b = v["busy-" r] + 0; i = ("irqs-" r) in v
                printf "%d %s %d %s %.1f\n", n, i ? v["irqs-" r] : "-", b,
                    i && n ? sprintf("%.3f", v["irqs-" r] / n) : "-", n ? b * 1e4 / n : 0
            }' "$f")
        if ((ios > 0)); then
            [[ $irq_io == - ]] || irq_req[$row,$target]+="$irq_io "
            busy_req[$row,$target]+="$busy_io "
            printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$target" "$row" "$ios" "$irqs" "$busy" >>"$out/guest.tsv"
        fi
    done
    # The back end's CPU and the host's steal through the rows that gave IOPS (a failed fio's
    # run says nothing): "ROW CPU% STEAL%", CPU% 0.0 (and not kept) without a back end.
    local sv
    while read -r row v sv; do
        [[ -n ${measured[$row]:-} ]] || continue
        if [[ -n $server_was ]]; then
            cpu[$row,$target]+="$v "
            printf '%s\t%s\t%s\t%s\n' "$round" "$target" "$row" "$v" >>"$out/cpu.tsv"
        fi
        steal[$row,$target]+="$sv "
        printf '%s\t%s\t%s\t%s\n' "$round" "$target" "$row" "$sv" >>"$out/steal.tsv"
    done < <(awk -v hz="$(getconf CLK_TCK)" '
        { ticks[$1, $2] = $3; at[$1, $2] = $4; st[$1, $2] = $5; all[$1, $2] = $6; rows[$2] = 1 }
        END {
            for (r in rows)
                if ((("start", r) in at) && (("end", r) in at) && at["end", r] > at["start", r] &&
                    all["end", r] > all["start", r])
                    printf "%s %.1f %.1f\n", r,
                        100 * (ticks["end", r] - ticks["start", r]) / hz / (at["end", r] - at["start", r]),
                        100 * (st["end", r] - st["start", r]) / (all["end", r] - all["start", r])
        }' "$out/$name.cpu" 2>/dev/null)
    while read -r line; do
        failures+=("$target (round $round): $line")
    done < <(awk '$1 == "RESULT" && $3 == "FAIL" { $1 = ""; print substr($0, 2) }' "$f" 2>/dev/null)
    grep -q '^DONE ' "$f" 2>/dev/null ||
        failures+=("$target (round $round): the guest script did not finish; see $out/$name.console")
}

for ((r = 1; r <= rounds; r++)); do
    order=("${targets[@]}")
    if ((r % 2 == 0)); then
        order=()
        for ((i = ${#targets[@]} - 1; i >= 0; i--)); do
            order+=("${targets[i]}")
        done
    fi
    for t in "${order[@]}"; do
        run_target "$r" "$t"
    done
done

median() { # VALUES...: the median (the mean of the two middle ones of an even count), or nothing
    (($#)) || return 0
    printf '%s\n' "$@" | sort -n |
        awk -v f="${MEDIAN_FORMAT:-%d}" '{ v[NR] = $1 } END { m = int((NR + 1) / 2); printf f "\n", NR % 2 ? v[m] : (v[m] + v[m + 1]) / 2 }'
}
ratio() {
    if [[ -n $1 && -n $2 && $2 != 0 ]]; then
        awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'
    else
        echo "-"
    fi
}
# meet VAR RATIO MIN: VAR (yes, "?" or no) becomes no when RATIO < MIN, "?" when there is no
# RATIO and it was yes.
meet() {
    local -n verdict=$1
    if [[ $2 == - ]]; then
        [[ $verdict != yes ]] || verdict="?"
    elif awk -v a="$2" -v m="$3" 'BEGIN { exit !(a < m) }'; then
        verdict=no
    fi
}

declare -A med med_cpu med_irq med_busy med_steal
for row in "${all_rows[@]}"; do
    for t in "${all_targets[@]}"; do
        # shellcheck disable=SC2086
        med_irq[$row,$t]=$(MEDIAN_FORMAT=%.2f median ${irq_req[$row,$t]:-})
        # shellcheck disable=SC2086
        med_busy[$row,$t]=$(MEDIAN_FORMAT=%.0f median ${busy_req[$row,$t]:-})
        # shellcheck disable=SC2086
        med[$row,$t]=$(median ${results[$row,$t]:-})
        # shellcheck disable=SC2086
        med_cpu[$row,$t]=$(MEDIAN_FORMAT=%.1f median ${cpu[$row,$t]:-})
        # shellcheck disable=SC2086
        med_steal[$row,$t]=$(MEDIAN_FORMAT=%.1f median ${steal[$row,$t]:-})
    done
done
# per_request PERCENT IOPS: microseconds of CPU per request, or "-".
per_request() {
    if [[ -n $1 && -n $2 && $2 != 0 ]]; then
        awk -v p="$1" -v i="$2" 'BEGIN { printf "%.1f", p * 1e4 / i }'
    else
        echo "-"
    fi
}
# per_target_table CELL: a table of every row by every target, each cell printed by
# "CELL ROW TARGET".
per_target_table() {
    local row t line
    printf '%-16s %14s %14s %14s %14s %14s\n' row sharedisk "scsi-hd thr" "scsi-hd iou" \
        "vhost-dev" "scsi-hd null"
    for row in "${all_rows[@]}"; do
        line=$(printf '%-16s' "$row")
        for t in "${all_targets[@]}"; do
            line+=$(printf ' %14s' "$("$1" "$row" "$t")")
        done
        echo "$line"
    done
}
guest_cell() { # ROW TARGET: "interrupts / busy µs" per request, or "-"
    if [[ -z ${med_busy[$1,$2]} ]]; then
        echo -
    else
        echo "${med_irq[$1,$2]:--} / ${med_busy[$1,$2]}"
    fi
}
steal_cell() { # ROW TARGET: the median steal %, or "-"
    echo "${med_steal[$1,$2]:--}"
}
ok_hd=yes ok_vds=yes
{
    echo "sharedisk over vhost-user vs QEMU scsi-hd vs vhost-device-scsi, from a Linux guest:"
    echo "  fio 4 KiB random, direct=1, $ioengine, ${secs} s (+${ramp} s ramp) per row," \
        "median of $rounds round(s); ${size_mib} MiB image filled with data"
    echo "  QEMU $(qemu-system-x86_64 --version | sed -n 's/.*version \([^ ]*\).*/\1/p;q') TCG" \
        "(-cpu max), $vcpus vCPUs, $mem per guest, host $(nproc) cores;" \
        "scsi-hd cache=$hd_cache"
    echo "  request queues: sharedisk $queues, scsi-hd $queues, vhost-device-scsi 1 (it serves one);" \
        "qd1 rows: 1 job x iodepth 1; qd16 rows: $qd16_jobs job(s) x iodepth $qd16_depth"
    echo "  TCG: the guest CPU dominates; compare the ratios, not the IOPS"
    printf '%-16s %10s %10s %10s %10s %9s %9s %10s %9s\n' "" sharedisk "scsi-hd" "scsi-hd" \
        "vhost-dev" "sd/" "sd/" "scsi-hd" "null/"
    printf '%-16s %10s %10s %10s %10s %9s %9s %10s %9s\n' row "" threads io_uring "-scsi(1q)" \
        "scsi-hd" "vds" "null-co" "vds"
    for row in "${rows[@]}"; do
        sd=${med[$row,sharedisk]} th=${med[$row,scsi-hd-threads]}
        iu=${med[$row,scsi-hd-io_uring]} vd=${med[$row,vhost-device-scsi]} ce=${med[$row,scsi-hd-null]}
        # shellcheck disable=SC2086
        best=$(printf '%s\n' $th $iu | sort -n | tail -n 1)
        r_hd=$(ratio "$sd" "$best") r_vd=$(ratio "$sd" "$vd")
        printf '%-16s %10s %10s %10s %10s %9s %9s %10s %9s\n' "$row" "${sd:--}" "${th:--}" \
            "${iu:--}" "${vd:--}" "$r_hd" "$r_vd" "${ce:--}" "$(ratio "$ce" "$vd")"
        meet ok_hd "$r_hd" 1
        [[ $row != *-qd16 ]] || meet ok_vds "$r_vd" 1.5
    done
    for row in "${paced[@]}"; do
        printf '%-16s %10s %10s %10s %10s %9s %9s\n' "$row" "${med[$row,sharedisk]:--}" \
            "${med[$row,scsi-hd-threads]:--}" "${med[$row,scsi-hd-io_uring]:--}" \
            "${med[$row,vhost-device-scsi]:--}" "(paced)" ""
    done
    echo "back-end CPU through each row, % of one host core (ramp included), and per request:"
    printf '%-16s %10s %10s %12s %12s %9s\n' row sharedisk "vhost-dev" "sd us/req" "vds us/req" "sd/vds"
    for row in "${all_rows[@]}"; do
        c_sd=${med_cpu[$row,sharedisk]} c_vd=${med_cpu[$row,vhost-device-scsi]}
        u_sd=$(per_request "$c_sd" "${med[$row,sharedisk]}")
        u_vd=$(per_request "$c_vd" "${med[$row,vhost-device-scsi]}")
        [[ $u_sd == - || $u_vd == - ]] && r_u=- || r_u=$(ratio "$u_sd" "$u_vd")
        printf '%-16s %10s %10s %12s %12s %9s\n' "$row" "${c_sd:--}" "${c_vd:--}" "$u_sd" "$u_vd" "$r_u"
    done
    echo "what each request cost the guest (medians): interrupts / us of busy vCPU time" \
        "(all vCPUs, ramp included)"
    per_target_table guest_cell
    echo "host CPU time taken by the hypervisor (steal) through each row, % (median; every" \
        "round in steal.tsv)"
    per_target_table steal_cell
    echo "target: sharedisk >= the better scsi-hd on every row: $ok_hd;" \
        ">= 1.5x vhost-device-scsi at qd16: $ok_vds"
    if ((${#failures[@]})); then
        echo "failed:"
        printf '  %s\n' "${failures[@]}"
    fi
} | tee "$out/table.txt"
((${#failures[@]} == 0))
