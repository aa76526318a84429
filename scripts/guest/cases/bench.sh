#!/bin/sh
# Benchmark guest (bench/vhost.sh): fio rows on the raw disk, one after the other, each
# reported as "VALUE iops-ROW N" (read plus write IOPS, rounded down) and a RESULT line.
#
# Environment (/etc/test.env):
#   BENCH_ROWS       "NAME:RW:IODEPTH:JOBS[:RATE] ..."; JOBS jobs of IODEPTH each, one per
#                    vCPU (cpus_allowed split), so each submits on its own request queue; with
#                    RATE each job offers at most RATE requests a second (fio rate_iops)
#   BENCH_SECONDS    measured seconds per row
#   BENCH_RAMP       seconds per row before measuring
#   BENCH_IOENGINE   io_uring or libaio
# Each row's fio run begins with a "[guest] fio NAME: ..." line on the console and ends with
# "[guest] fio NAME end" (bench/vhost.sh times the back end's CPU between them).
# The fio JSON of each row goes to the console. Around each fio run (ramp included) the guest
# counts what each request cost it: "VALUE ios-ROW N" requests the disk completed,
# "VALUE irqs-ROW N" interrupts of the virtio request queues (not given when no interrupt line
# of theirs was found), "VALUE busy-ROW N" clock ticks (100 a second) the vCPUs were busy, all
# of them together.
. /lib.sh
. /etc/test.env

first_disk
# The same block-layer settings whatever the target reports: no I/O scheduler, not rotational.
echo none >"/sys/block/$disk/queue/scheduler" 2>/dev/null
echo 0 >"/sys/block/$disk/queue/rotational" 2>/dev/null
value cpus "$(grep -c ^processor /proc/cpuinfo)"
value hw-queues "$(ls "/sys/block/$disk/mq" | wc -l)"
value scheduler "$(cat "/sys/block/$disk/queue/scheduler")"
value size-bytes "$(($(cat "/sys/block/$disk/size") * 512))"

# iops_of FILE SECTION: the "iops" of the read or write section of fio's JSON (one job,
# group_reporting).
iops_of() {
    awk -v sec="$2" '
        /^ *"(read|write|trim|sync)" : \{/ { cur = $1; gsub(/"/, "", cur) }
        cur == sec && /^ *"iops" : / { v = $3; sub(/,$/, "", v); print v; exit }
    ' "$1"
}

# counters: "IOS IRQS BUSY" so far: reads plus writes the disk completed (fields 1 and 5 of
# /sys/block/DISK/stat); interrupts of the request queues on every CPU (named
# virtioN-request, or virtioN-virtqueues when all the device's queues, control and event
# included, share one vector), "-" when there is no such line (no MSI-X); and user, nice,
# system, irq and softirq ticks of all CPUs (/proc/stat). Prints nothing when the disk's
# counts cannot be read.
counters() {
    # shellcheck disable=SC2046
    set -- $(cat "/sys/block/$disk/stat")
    irqs=$(awk '
        $NF ~ /^virtio[0-9]+-(request|virtqueues)$/ {
            n++
            for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) s += $i
        }
        END { print n ? s : "-" }' /proc/interrupts)
    busy=$(awk '$1 == "cpu" { print $2 + $3 + $4 + $7 + $8; exit }' /proc/stat)
    echo "$(($1 + $5)) $irqs $busy"
}

cpus=$(grep -c ^processor /proc/cpuinfo)
for row in $BENCH_ROWS; do
    name=${row%%:*} rest=${row#*:}
    rw=${rest%%:*} rest=${rest#*:}
    depth=${rest%%:*} rest=${rest#*:}
    jobs=${rest%%:*} rate=
    [ "$rest" = "$jobs" ] || rate="--rate_iops=${rest#*:}"
    aff=
    if [ "$jobs" -gt 1 ] && [ "$jobs" -le "$cpus" ]; then
        aff="--cpus_allowed=0-$((jobs - 1)) --cpus_allowed_policy=split"
    fi
    before=$(counters)
    echo "[guest] fio $name: $rw, $jobs job(s) x iodepth $depth${rate:+, $rate}"
    # shellcheck disable=SC2086
    timeout $((BENCH_SECONDS + BENCH_RAMP + 60)) fio --name="$name" --filename="$dev" \
        --direct=1 --ioengine="$BENCH_IOENGINE" --rw="$rw" --bs=4k --iodepth="$depth" \
        --numjobs="$jobs" $aff $rate --group_reporting --norandommap --randrepeat=0 \
        --time_based --runtime="$BENCH_SECONDS" --ramp_time="$BENCH_RAMP" \
        --output-format=json --output=/tmp/fio.json >/tmp/fio.err 2>&1
    rc=$?
    echo "[guest] fio $name end"
    after=$(counters)
    # shellcheck disable=SC2086
    set -- $before $after
    if [ $# -eq 6 ]; then
        value "ios-$name" $(($4 - $1))
        value "busy-$name" $(($6 - $3))
        [ "$2" = - ] || [ "$5" = - ] || value "irqs-$name" $(($5 - $2))
    fi
    cat /tmp/fio.json /tmp/fio.err
    r=$(iops_of /tmp/fio.json read)
    w=$(iops_of /tmp/fio.json write)
    err=$(awk '/^ *"error" : / { v = $3; sub(/,$/, "", v); print v; exit }' /tmp/fio.json)
    iops=$(awk -v r="${r:-0}" -v w="${w:-0}" 'BEGIN { printf "%d", r + w }')
    if [ "$rc" -eq 0 ] && [ "${err:-1}" = 0 ] && [ "$iops" -gt 0 ]; then
        value "iops-$name" "$iops"
        pass "fio-$name" "$iops IOPS"
    else
        fail "fio-$name" "fio exit $rc, error ${err:-none}, $iops IOPS: $(tail -n 3 /tmp/fio.err | tr '\n' ' ')"
    fi
done
finish
