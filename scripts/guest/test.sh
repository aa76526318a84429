#!/usr/bin/env bash
# Real Linux guests under QEMU (TCG) against SCSI disks: the guest scripts in cases/ run in
# guests built by build.sh and booted by run.sh; this script starts the targets, boots the
# guests, releases multi-guest phases (SYNC/GO), does the host's side of the checks and prints
# one line per case, then "guest: N passed, N failed".
#
#   scripts/guest/test.sh [GROUP...]      default: selftest sharedisk
#
# Groups:
#   selftest   the harness itself, against what exists today: QEMU's own virtio-scsi + scsi-hd
#              (one guest; LU reset), and sharedisk's iSCSI frontend reached through QEMU's
#              iSCSI initiator and SCSI passthrough (one guest; the two-guest fence sequence)
#   sharedisk  sharedisk's vhost-user-scsi frontend (`serve --vhost-user SOCKET`): one guest
#              (and one on an LU with direct I/O, `--direct`, one on an LU of 4096-byte blocks);
#              one booted through SeaBIOS; two guests on two sockets (fence); mixed vhost-user +
#              iSCSI (fence); LU reset; an LU added and removed while the guest runs (`sharedisk
#              lu add|remove`, hotplug); a guest killed while it holds a persistent reservation
#              and the next booted on its socket (reconnect); and its iSCSI frontend reached by
#              Linux's own initiator in the guest (open-iscsi, iscsi_tcp): one guest with
#              digests (and one on 4096-byte blocks), CHAP (discovery, one-way and mutual, wrong
#              secrets refused), two sessions from one guest (two I_T nexuses, one reservation),
#              two guests (fence), LU reset, the daemon killed and started again under the
#              guest's writes (restart)
#   peer       the one-guest case against vhost-device-scsi (`cargo install vhost-device-scsi`),
#              which shows the vhost-user path of the harness; by hand, not in CI
#
# GUEST_TIMEOUT=SECONDS bounds each guest (default 120). GUEST_CASES=PATTERN runs only the cases whose name (e.g. iscsi/fence) matches the pattern.
#
# A case passes when every guest script ran to its end (it reported FINISH N through lib.sh's
# finish and then exited with status N: DONE N; DONE 0 when all its checks passed), every
# guest's QEMU exited cleanly, every check the guests and the host made passed (except those listed with a reason in expected/TARGET.CASE, which must fail: the
# lists can only shrink), and values the guests report agree where they must. Each case's
# files (consoles, results, QEMU command lines, daemon logs) are in out/guest/CASE/.
#
# Needs qemu-system-x86, qemu-utils and qemu-block-extra (installed through apt when missing,
# as root; a missing tool is a failure, never a skip), and cargo for the daemon.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out=$root/out/guest
groups=("$@")
((${#groups[@]})) || groups=(selftest sharedisk)
img_size=128M
# Where the one-guest case checks the host's path: the host writes XCHECK_IN before the guest
# boots, the guest writes XCHECK_OUT (1 MiB each).
xcheck_in=8388608 xcheck_out=16777216
initiator_base=iqn.2026-01.io.sharedisk.test
# Seconds a guest may run (a case takes 10-20 s here); GUEST_TIMEOUT overrides.
guest_timeout=${GUEST_TIMEOUT:-120}

log() { printf '%s\n' "$*" >&2; }

# --- tools ------------------------------------------------------------------------------------
need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
# QEMU's iSCSI driver (qemu-block-extra) exists in Debian 12 only for its own QEMU 7.2; a newer
# qemu-utils (e.g. from backports) is replaced by bookworm's, as bench/install.sh does.
if ! { [[ -e /usr/lib/x86_64-linux-gnu/qemu/block-iscsi.so ]] && command -v qemu-io >/dev/null &&
    qemu-img --version 2>/dev/null | grep -q "version 7\.2"; }; then
    need+=(qemu-utils/bookworm qemu-block-extra/bookworm)
fi
if ((${#need[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        log "guest tests: missing ${need[*]}; run as root or install them"
        exit 1
    fi
    log "guest tests: installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >&2
    apt-get install -y -q --allow-downgrades --no-install-recommends "${need[@]}" >&2
fi
for g in "${groups[@]}"; do
    [[ $g == peer ]] || continue
    if ! command -v vhost-device-scsi >/dev/null; then
        log "guest tests: installing vhost-device-scsi"
        cargo install --locked vhost-device-scsi >&2
    fi
done

guest=$("$here/build.sh")
cargo build --release --locked -p sharedisk --bin sharedisk --manifest-path "$root/Cargo.toml" >&2
bin=${SHAREDISK_BIN:-${CARGO_TARGET_DIR:-$root/target}/release/sharedisk}

rm -rf "$out"
mkdir -p "$out"

# --- processes --------------------------------------------------------------------------------
pids=() # every process this script started; ended on exit
cleanup() {
    local p f
    # Guests still running (an interrupted run): run.sh's timeout passes SIGTERM on to QEMU.
    for f in "$out"/*/*.pid; do
        [[ -f $f ]] && kill -TERM "$(cat "$f")" 2>/dev/null || true
    done
    for p in "${pids[@]}"; do
        kill -KILL "$p" 2>/dev/null || true
    done
    wait 2>/dev/null || true
}
trap cleanup EXIT

# daemon_start DIR IMAGE ARGS...: sharedisk serve on a fresh image; sets daemon_pid and
# daemon_url. Each --vhost-user socket in ARGS must appear.
daemon_start() {
    local dir=$1 img=$2
    shift 2
    rm -f "$img" "$img.pr"
    daemon_args=("$dir" "$img" "$@")
    daemon_launch 127.0.0.1:0 "${daemon_args[@]}"
}

# daemon_launch LISTEN DIR IMAGE ARGS...: daemon_start's launch and wait, on LISTEN.
daemon_launch() {
    local listen=$1 dir=$2 img=$3
    shift 3
    RUST_LOG=${RUST_LOG:-info} "$bin" serve --file "$img" --size "$img_size" \
        --listen "$listen" --control "$dir/control.sock" "$@" \
        >"$dir/daemon.out" 2>>"$dir/daemon.log" &
    daemon_ready "$dir" "$@"
}

# daemon_config DIR CONFIG: sharedisk serve --config CONFIG (its portals on ephemeral ports,
# its control socket in DIR); sets daemon_pid and daemon_url (the first LU's).
daemon_config() {
    local dir=$1
    RUST_LOG=${RUST_LOG:-info} "$bin" serve --config "$2" \
        >"$dir/daemon.out" 2>>"$dir/daemon.log" &
    daemon_ready "$dir"
}

# daemon_ready DIR ARGS...: waits for the daemon just started in the background to print its
# URL, and for each --vhost-user socket in ARGS to appear.
daemon_ready() {
    local dir=$1
    shift
    daemon_pid=$!
    pids+=("$daemon_pid")
    daemon_url=
    local i
    for ((i = 0; i < 300; i++)); do
        daemon_url=$(grep -m1 '^iscsi://' "$dir/daemon.out" 2>/dev/null || true)
        [[ -n $daemon_url ]] && break
        kill -0 "$daemon_pid" 2>/dev/null || break
        sleep 0.1
    done
    if [[ -z $daemon_url ]]; then
        host_fail daemon-starts "no URL printed; $(tail -n 3 "$dir/daemon.log" | tr '\n' ' ')"
        return 1
    fi
    local a
    for a in "$@"; do
        [[ $a == *.sock && $a != "$dir/control.sock" ]] || continue
        for ((i = 0; i < 100; i++)); do
            [[ -S $a ]] && break
            sleep 0.1
        done
        [[ -S $a ]] || { host_fail vhost-user-socket "$a did not appear"; return 1; }
    done
}

# daemon_crash_restart: the daemon dies (SIGKILL, as in a crash: nothing is flushed, nothing
# said to the initiators) and starts again on the same image and port.
daemon_crash_restart() {
    local port=${daemon_url#iscsi://*:}
    port=${port%%/*}
    kill -KILL "$daemon_pid"
    wait "$daemon_pid" 2>/dev/null || true
    echo "--- killed (SIGKILL) and started again on port $port" >>"${daemon_args[0]}/daemon.log"
    daemon_launch "127.0.0.1:$port" "${daemon_args[@]}"
}

# daemon_stop: SIGTERM; the daemon must still be there, and exit 0.
daemon_stop() {
    if ! kill -0 "$daemon_pid" 2>/dev/null; then
        host_fail daemon-alive "the daemon is gone"
        wait "$daemon_pid" 2>/dev/null || true
        return
    fi
    host_pass daemon-alive
    kill -TERM "$daemon_pid"
    local rc=0
    wait "$daemon_pid" || rc=$?
    ((rc == 0)) && host_pass daemon-stops-cleanly || host_fail daemon-stops-cleanly "exit $rc"
}

# peer_start DIR IMAGE SOCKET: vhost-device-scsi on IMAGE (one request queue).
peer_start() {
    "$(command -v vhost-device-scsi)" --socket-path "$3" "$2" >"$1/peer.log" 2>&1 &
    daemon_pid=$!
    pids+=("$daemon_pid")
    local i
    for ((i = 0; i < 100; i++)); do
        [[ -S $3 ]] && return 0
        sleep 0.1
    done
    host_fail peer-socket "$3 did not appear"
    return 1
}

# --- host checks and the verdict of a case ----------------------------------------------------
case_dir= case_host=
host_pass() { echo "RESULT $1 PASS ${2:-}" >>"$case_host"; }
host_fail() { echo "RESULT $1 FAIL ${2:-}" >>"$case_host"; log "  host: FAIL $1 ${2:-}"; }

# host_write_iscsi URL OFFSET FILE / host_read_iscsi URL OFFSET LENGTH OUT: the host's own
# iSCSI path (QEMU's initiator, another I_T nexus than any guest's).
host_write_iscsi() {
    qemu-io -f raw -c "write -q -s $3 $2 $(stat -c %s "$3")" "$1" >>"$case_dir/host-io.log" 2>&1
}
host_read_iscsi() {
    # iscsi://PORTAL/TARGET/LUN, read through a raw node limited to the range.
    local rest=${1#iscsi://}
    local portal=${rest%%/*} lun=${rest##*/}
    rest=${rest#*/}
    local target=${rest%/*}
    rm -f "$4"
    qemu-img convert -O raw "json:{\"driver\": \"raw\", \"offset\": $2, \"size\": $3,
        \"file\": {\"driver\": \"iscsi\", \"transport\": \"tcp\", \"portal\": \"$portal\",
        \"target\": \"$target\", \"lun\": $lun}}" "$4" >>"$case_dir/host-io.log" 2>&1
}

# selected NAME: whether the case is to run (GUEST_CASES, a shell pattern; default all).
selected() {
    # shellcheck disable=SC2053
    [[ $1 == ${GUEST_CASES:-*} ]]
}

case_start() {
    case_name=$1
    case_dir=$out/${1//\//-}
    case_host=$case_dir/host.results
    mkdir -p "$case_dir"
    : >"$case_host"
    case_t0=$(date +%s)
    log "--- $case_name"
}

passed=0 failed=0
# case_end EXPECTED GUEST...: the verdict, from the guests' and the host's results.
case_end() {
    local expected=$1
    shift
    local problems=() g f name
    declare -A want=() seen=()
    if [[ -f $here/expected/$expected ]]; then
        while read -r name _; do
            [[ -z $name || $name == \#* ]] || want[$name]=1
        done <"$here/expected/$expected"
    fi
    for g in "$@"; do
        f=$case_dir/$g.results
        if [[ ! -s $f ]]; then
            problems+=("$g: no results$(grep -m1 "^$g: " "$case_dir/run.log" 2>/dev/null | sed 's/^[^:]*:/ (/; s/$/)/')")
            continue
        fi
        # The script ran to its end: finish reported FINISH N, and the script then exited
        # with N (DONE N). Anything else (no FINISH: it exited early or crashed; another
        # status) fails the case, whatever its checks said.
        local fin done_rc
        fin=$(awk '$1 == "FINISH" { n = $2 } END { print n }' "$f")
        done_rc=$(awk '$1 == "DONE" { n = $2 } END { print n }' "$f")
        if [[ -z $done_rc ]]; then
            problems+=("$g: the script did not finish")
        elif [[ -z $fin ]]; then
            problems+=("$g: the script exited (status $done_rc) before its end")
        elif [[ $done_rc != "$fin" ]]; then
            problems+=("$g: the script ended with status $done_rc, not the $fin of its failed checks")
        fi
    done
    local files=("$case_host")
    for g in "$@"; do files+=("$case_dir/$g.results"); done
    while read -r name; do
        [[ -n $name ]] || continue
        seen[$name]=1
        [[ -n ${want[$name]:-} ]] || problems+=("failed: $name")
    done < <(cat "${files[@]}" 2>/dev/null |
        awk '$1 == "RESULT" && $3 == "FAIL" { print $2 }' | sort -u)
    for name in "${!want[@]}"; do
        [[ -n ${seen[$name]:-} ]] || problems+=("expected to fail but did not: $name (update expected/$expected)")
    done
    local secs=$(($(date +%s) - case_t0))
    if ((${#problems[@]})); then
        failed=$((failed + 1))
        echo "FAIL $case_name (${secs}s): $(IFS=';'; echo "${problems[*]}") [logs: ${case_dir#"$root"/}]"
    else
        passed=$((passed + 1))
        echo "PASS $case_name (${secs}s)"
    fi
}

# --- booting guests ---------------------------------------------------------------------------
# run_status NAME RC: the host's check of run.sh's exit status for guest NAME. 0 and 1 (a check
# failed, or the script ended with another status: case_end judges that from the results)
# leave it to the results; a time-out, QEMU failing or anything else fails the case here.
run_status() {
    case $2 in
    0 | 1) ;;
    124) host_fail "$1-timeout" "the guest did not finish in time" ;;
    3) host_fail "$1-qemu" "QEMU failed (see $1.qemu.log)" ;;
    *) host_fail "$1-run" "run.sh exited with status $2 (see run.log)" ;;
    esac
}

# boot NAME SCRIPT RUN-OPTIONS...: one guest, in the foreground.
boot() {
    local name=$1 script=$2
    shift 2
    local rc=0
    "$here/run.sh" --guest "$guest" --dir "$case_dir" --name "$name" --timeout "$guest_timeout" \
        --script "$here/cases/$script" "$@" 2>>"$case_dir/run.log" || rc=$?
    run_status "$name" "$rc"
    return 0
}

# boot_together "NAME SCRIPT RUN-OPTIONS..." ...: guests in parallel, their SYNC points
# released together: a point is released (GO) once every guest has reached it, after the
# host's own step for it (the function named by $on_sync, when set, called with the point's
# name); a guest that ends while others wait makes the host send them ABORT.
boot_together() {
    local specs=("$@") names=() bgs=() spec i
    for spec in "${specs[@]}"; do
        # shellcheck disable=SC2086
        set -- $spec
        names+=("$1")
        local n=$1 s=$2
        shift 2
        "$here/run.sh" --guest "$guest" --dir "$case_dir" --name "$n" --timeout "$guest_timeout" \
            --script "$here/cases/$s" "$@" 2>>"$case_dir/run.log" &
        bgs+=($!)
        pids+=($!)
    done
    declare -A released=()
    local alive point all g
    while :; do
        alive=0
        for i in "${!bgs[@]}"; do
            kill -0 "${bgs[$i]}" 2>/dev/null && alive=$((alive + 1))
        done
        ((alive)) || break
        local files=()
        for g in "${names[@]}"; do files+=("$case_dir/$g.results"); done
        for point in $(cat "${files[@]}" 2>/dev/null |
            awk '$1 == "SYNC" { print $2 }' | sort -u); do
            [[ -z ${released[$point]:-} ]] || continue
            all=1
            for g in "${names[@]}"; do
                grep -qx "SYNC $point" "$case_dir/$g.results" 2>/dev/null || all=0
            done
            if ((all)); then
                released[$point]=1
                [[ -z ${on_sync:-} ]] || "$on_sync" "$point"
                for g in "${names[@]}"; do
                    printf 'GO %s\n' "$point" 1<>"$case_dir/$g.ctl.in"
                done
            else
                for i in "${!names[@]}"; do
                    g=${names[$i]}
                    if grep -q '^DONE ' "$case_dir/$g.results" 2>/dev/null ||
                        ! kill -0 "${bgs[$i]}" 2>/dev/null; then
                        released[$point]=aborted
                        host_fail "sync-$point" "$g ended before reaching it"
                        local h
                        for h in "${names[@]}"; do
                            [[ -p $case_dir/$h.ctl.in ]] && printf 'ABORT\n' 1<>"$case_dir/$h.ctl.in"
                        done
                        break
                    fi
                done
            fi
        done
        sleep 0.2
    done
    for i in "${!bgs[@]}"; do
        local rc=0
        wait "${bgs[$i]}" || rc=$?
        run_status "${names[$i]}" "$rc"
    done
}

# same_values A B PREFIX...: each VALUE whose name starts with a PREFIX is the same in guests A
# and B.
same_values() {
    local a=$case_dir/$1.results b=$case_dir/$2.results
    shift 2
    local p name va vb
    for p in "$@"; do
        for name in $(awk -v p="$p" '$1 == "VALUE" && index($2, p) == 1 { print $2 }' "$a" "$b" | sort -u); do
            va=$(awk -v n="$name" '$1 == "VALUE" && $2 == n { $1 = ""; $2 = ""; print substr($0, 3) }' "$a")
            vb=$(awk -v n="$name" '$1 == "VALUE" && $2 == n { $1 = ""; $2 = ""; print substr($0, 3) }' "$b")
            if [[ -n $va && $va == "$vb" ]]; then
                host_pass "agree-$name" "$va"
            else
                host_fail "agree-$name" "'$va' vs '$vb'"
            fi
        done
    done
}

# --- cases ------------------------------------------------------------------------------------
# one_guest TARGET DISK HOSTPATH [RUN-OPTIONS...]: the one-guest case against a target that
# case_start began, the disk given to run.sh as DISK (none when empty: the guest reaches it
# itself, see linux_iscsi), with the host path for the cross-check being an iSCSI URL or
# an image file (read and written only while no guest runs). sharedisk (TARGET iscsi,
# linux-iscsi or vhost-user) serves its image, in out/guest on a file system that punches holes
# (ext4, XFS), thin with LBPRZ=1: the guest must see that (WANT_LBPRZ), not merely skip the
# unmap-zeros check when it does not.
one_guest() {
    local target=$1 disk=$2 hostpath=$3 opts=()
    shift 3
    [[ $target != iscsi && $target != linux-iscsi && $target != vhost-user ]] ||
        opts=(--env WANT_LBPRZ=1)
    [[ -z $disk ]] || opts+=(--disk "$disk")
    head -c 1048576 /dev/urandom >"$case_dir/from-host.bin"
    head -c 1048576 /dev/urandom >"$case_dir/to-host.bin"
    if [[ $hostpath == iscsi://* ]]; then
        host_write_iscsi "$hostpath" "$xcheck_in" "$case_dir/from-host.bin" ||
            host_fail host-writes "qemu-io write over iSCSI failed"
    else
        dd if="$case_dir/from-host.bin" of="$hostpath" bs=1M seek=$((xcheck_in / 1048576)) \
            conv=notrunc status=none
    fi
    boot guest one.sh --initiator "$initiator_base:guest1" \
        --data from-host="$case_dir/from-host.bin" --data to-host="$case_dir/to-host.bin" \
        --env XCHECK_IN="$xcheck_in" --env XCHECK_OUT="$xcheck_out" "${opts[@]}" "$@"
    if [[ $hostpath == iscsi://* ]]; then
        host_read_iscsi "$hostpath" "$xcheck_out" 1048576 "$case_dir/back.bin" ||
            host_fail host-reads "qemu-img dd over iSCSI failed"
    else
        dd if="$hostpath" of="$case_dir/back.bin" bs=1M skip=$((xcheck_out / 1048576)) count=1 status=none
    fi
    if cmp -s "$case_dir/back.bin" "$case_dir/to-host.bin"; then
        host_pass guest-to-host "the host reads what the guest wrote"
    else
        host_fail guest-to-host "the host does not read what the guest wrote"
    fi
}

# fence NAME1 DISK1 NAME2 DISK2: the two-guest fence sequence, then the agreement of what both
# saw at each phase. A DISK is a run.sh disk, or the run options that make the guest reach
# it itself (linux_iscsi).
fence() {
    local d1=$2 d2=$4
    [[ $d1 == --* ]] || d1="--disk $d1"
    [[ $d2 == --* ]] || d2="--disk $d2"
    boot_together "$1 pr-fence.sh $d1 --initiator $initiator_base:$1 --env ROLE=1" \
        "$3 pr-fence.sh $d2 --initiator $initiator_base:$3 --env ROLE=2"
    same_values "$1" "$3" registered- reserved- preempted-
}

# hotplug: the run-time LU case (cases/hotplug.sh) on the daemon that case_start began, with
# its socket in $s1: LUN 1 is added when the guest has booted, grown, and removed once it has
# read it, with `sharedisk lu`; the image is then closed and holds what the guest wrote.
lun1_bytes=16777216
hotplug() {
    local img=$case_dir/lun1.img
    rm -f "$img" "$img.pr"
    truncate -s "$lun1_bytes" "$img"
    head -c 1048576 /dev/urandom >"$case_dir/pattern.bin"
    head -c 1048576 /dev/urandom >"$case_dir/to-host.bin"
    dd if="$case_dir/pattern.bin" of="$img" conv=notrunc status=none
    on_sync=hotplug_step
    boot_together "guest hotplug.sh --disk vhost-user:$s1,num_queues=2 \
        --data pattern=$case_dir/pattern.bin --data to-host=$case_dir/to-host.bin \
        --env LUN1_BYTES=$lun1_bytes"
    on_sync=
    dd if="$img" of="$case_dir/back.bin" bs=1M skip=1 count=1 status=none
    if cmp -s "$case_dir/back.bin" "$case_dir/to-host.bin"; then
        host_pass lun1-image-holds-guest-write
    else
        host_fail lun1-image-holds-guest-write "the image does not hold what the guest wrote to LUN 1"
    fi
}

# lu ARGS...: `sharedisk lu ARGS` on this case's daemon, logged.
lu() {
    echo "\$ sharedisk lu $*" >>"$case_dir/lu.log"
    "$bin" lu "$@" --control "$case_dir/control.sock" >>"$case_dir/lu.log" 2>&1
}

# hotplug_step POINT: the host's part at each of the hotplug guest's SYNC points.
hotplug_step() {
    local img=$case_dir/lun1.img i
    case $1 in
    booted)
        if lu add --vhost-user "$s1" --lun 1 --file "$img"; then
            host_pass lu-add
        else
            host_fail lu-add "$(tail -n 1 "$case_dir/lu.log")"
        fi
        lu list || true
        if grep -q "^  target 0 LUN 1 .*$img" "$case_dir/lu.log"; then
            host_pass lu-list-shows-lun1
        else
            host_fail lu-list-shows-lun1 "lu list does not show LUN 1 (see lu.log)"
        fi
        # The daemon holds the image's lock.
        if flock -n -x "$img" true; then
            host_fail lun1-locked "the image is not locked while served"
        else
            host_pass lun1-locked
        fi
        ;;
    added)
        if lu remove --vhost-user "$s1" --lun 1; then
            host_pass lu-remove
        else
            host_fail lu-remove "$(tail -n 1 "$case_dir/lu.log")"
        fi
        # Nothing else serves it: closed, its lock released.
        for ((i = 0; i < 50; i++)); do
            flock -n -x "$img" true && break
            sleep 0.1
        done
        if ((i < 50)); then host_pass lun1-closed; else host_fail lun1-closed "the image is still locked"; fi
        ;;
    grow)
        truncate -s $((lun1_bytes * 2)) "$img"
        if lu rescan "$img"; then
            host_pass lu-rescan
        else
            host_fail lu-rescan "$(tail -n 1 "$case_dir/lu.log")"
        fi
        ;;
    esac
}

# host_may_write NAME WANT: the check NAME that the host's own iSCSI nexus (daemon_url) writes
# 4 KiB at 32 MiB (WANT ok) or is refused (WANT refused: QEMU's initiator reports a
# reservation conflict as an I/O error like any other failed write, so the case pairs this
# with host_sees_holder).
host_may_write() {
    local out rc=0
    out=$(qemu-io -f raw -c "write -q -P 0x5a 33554432 4096" "$daemon_url" 2>&1) || rc=$?
    echo "$1: exit $rc: $out" >>"$case_dir/host-io.log"
    out=$(echo "$out" | tr '\n' ' ')
    case $2,$rc in
    ok,0) host_pass "$1" ;;
    refused,0) host_fail "$1" "the write went through" ;;
    refused,*) host_pass "$1" "$out" ;;
    *) host_fail "$1" "exit $rc: $out" ;;
    esac
}

# host_sees_holder NAME INITIATOR: the check NAME that `sharedisk pr show` has the LU reserved
# Write Exclusive (type 1) by INITIATOR.
host_sees_holder() {
    local out
    out=$("$bin" pr show --control "$case_dir/control.sock" 2>&1) || true
    echo "$1: $out" >>"$case_dir/host-io.log"
    if grep -q "^reservation: type 1h .*held by .*$2" <<<"$out"; then
        host_pass "$1" "$(grep '^reservation:' <<<"$out")"
    else
        host_fail "$1" "$(tr '\n' ' ' <<<"$out")"
    fi
}

# reconnect SOCKET INITIATOR: cases/reconnect.sh on the daemon that case_start began, whose
# socket SOCKET is configured with INITIATOR: guest1 registers and reserves, its QEMU is
# killed (SIGKILL: the socket closes with nothing released), then guest2 boots on the same
# socket; between them the host's iSCSI nexus checks the reservation holds.
reconnect() {
    local sock=$1 name=$2 i rc=0 bg n detail
    head -c 1048576 /dev/urandom >"$case_dir/pattern.bin"
    local opts=(--disk "vhost-user:$sock,num_queues=2" --initiator "$name"
        --data pattern="$case_dir/pattern.bin" --env WANT_INITIATOR="$name")
    "$here/run.sh" --guest "$guest" --dir "$case_dir" --name guest1 --timeout "$guest_timeout" \
        --script "$here/cases/reconnect.sh" "${opts[@]}" --env ROLE=1 2>>"$case_dir/run.log" &
    bg=$!
    pids+=("$bg")
    for ((i = 0; i < guest_timeout * 5; i++)); do
        grep -qx "SYNC held" "$case_dir/guest1.results" 2>/dev/null && break
        kill -0 "$bg" 2>/dev/null || break
        sleep 0.2
    done
    if grep -qx "SYNC held" "$case_dir/guest1.results" 2>/dev/null; then
        host_may_write host-refused-while-held refused
        host_sees_holder host-sees-holder-while-held "$name"
        # run.sh's pid file names the `timeout` that runs QEMU: QEMU is its child.
        pkill -KILL -P "$(cat "$case_dir/guest1.pid")" || host_fail guest1-killed "no QEMU to kill"
    else
        host_fail guest1-held "guest1 never reached SYNC held"
    fi
    wait "$bg" || rc=$?
    # QEMU killed: run.sh reports QEMU failing (3), as it must.
    ((rc == 3)) && host_pass guest1-killed || host_fail guest1-killed "run.sh exited $rc, not 3"
    # guest1 never finishes: its checks up to the kill count here.
    while read -r _ n _ detail; do
        host_fail "guest1-$n" "$detail"
    done < <(grep '^RESULT [^ ]* FAIL' "$case_dir/guest1.results" 2>/dev/null || true)
    grep -q '^RESULT full-status-names-initiator PASS' "$case_dir/guest1.results" ||
        host_fail guest1-checked "guest1 did not check READ FULL STATUS"
    # The daemon saw the socket close and ended the nexus before the next guest connects.
    for ((i = 0; i < 50; i++)); do
        grep -q 'frontend disconnected; I_T nexus lost' "$case_dir/daemon.log" && break
        sleep 0.1
    done
    grep -q 'frontend disconnected; I_T nexus lost' "$case_dir/daemon.log" &&
        host_pass nexus-lost || host_fail nexus-lost "the daemon did not log the disconnection"
    host_may_write host-refused-after-kill refused
    host_sees_holder host-sees-holder-after-kill "$name"
    boot guest2 reconnect.sh "${opts[@]}" --env ROLE=2
    host_may_write host-writes-after-release ok
}

# linux_iscsi [DIGEST]: the run options of a guest that reaches the daemon's LU (daemon_url)
# through Linux's own iSCSI initiator (lib.sh's iscsi_attach), asking for DIGEST (None or
# CRC32C) as header and data digests.
linux_iscsi() {
    local rest=${daemon_url#iscsi://}
    local port=${rest%%/*}
    port=${port##*:}
    rest=${rest#*/}
    echo "--nic user --env ISCSI_PORTAL=10.0.2.2:$port --env ISCSI_TARGET=${rest%/*}" \
        "--env ISCSI_DIGEST=${1:-None}"
}

# restart_step POINT: the host's part of the restart guest's SYNC point.
restart_step() {
    case $1 in
    loaded)
        if daemon_crash_restart; then host_pass daemon-restarts; else host_fail daemon-restarts; fi
        ;;
    esac
}

selftest() {
    local img
    if selected scsi-hd/one; then
        case_start scsi-hd/one
        img=$case_dir/disk.img
        truncate -s "$img_size" "$img"
        one_guest scsi-hd "scsi-hd:$img" "$img"
        case_end scsi-hd.one guest
    fi

    if selected scsi-hd/lu-reset; then
        case_start scsi-hd/lu-reset
        img=$case_dir/disk.img
        truncate -s "$img_size" "$img"
        boot guest lu-reset.sh --disk "scsi-hd:$img"
        case_end scsi-hd.lu-reset guest
    fi

    if selected iscsi/one; then
        case_start iscsi/one
        if daemon_start "$case_dir" "$case_dir/disk.img"; then
            one_guest iscsi "iscsi:$daemon_url" "$daemon_url"
            daemon_stop
        fi
        case_end iscsi.one guest
    fi

    if selected iscsi/fence; then
        case_start iscsi/fence
        if daemon_start "$case_dir" "$case_dir/disk.img"; then
            fence guest1 "iscsi:$daemon_url" guest2 "iscsi:$daemon_url"
            daemon_stop
        fi
        case_end iscsi.fence guest1 guest2
    fi
}

sharedisk() {
    local s1 s2
    if selected vhost-user/one; then
        case_start vhost-user/one
        s1=$case_dir/vhost1.sock
        # Both request queues on one thread here, a thread each in vhost-user/direct: both
        # layouts run whatever the host's cores make the default.
        if daemon_start "$case_dir" "$case_dir/disk.img" --vhost-user "$s1" --vhost-threads 1; then
            one_guest vhost-user "vhost-user:$s1,num_queues=2" "$daemon_url"
            daemon_stop
        fi
        case_end vhost-user.one guest
    fi

    if selected vhost-user/direct; then
        # The same checks on an LU served with direct I/O: the guest's page-aligned buffers go
        # to O_DIRECT as they are, others through the driver's aligned bounce buffer.
        case_start vhost-user/direct
        s1=$case_dir/vhost1.sock
        if daemon_start "$case_dir" "$case_dir/disk.img" --vhost-user "$s1" --direct \
            --vhost-threads 2; then
            one_guest vhost-user "vhost-user:$s1,num_queues=2" "$daemon_url"
            daemon_stop
        fi
        case_end vhost-user.direct guest
    fi

    # Linux's own iSCSI initiator (open-iscsi, iscsi_tcp) in the guest, over the guest's
    # network: the one-guest checks with header and data digests, the fence sequence between
    # two such guests, and LOGICAL UNIT RESET from the kernel's error handler.
    if selected linux-iscsi/one; then
        case_start linux-iscsi/one
        if daemon_start "$case_dir" "$case_dir/disk.img"; then
            # shellcheck disable=SC2046
            one_guest linux-iscsi "" "$daemon_url" $(linux_iscsi CRC32C) --env ISCSI_IDLE=12
            daemon_stop
        fi
        case_end linux-iscsi.one guest
    fi

    if selected linux-iscsi/fence; then
        case_start linux-iscsi/fence
        if daemon_start "$case_dir" "$case_dir/disk.img"; then
            fence guest1 "$(linux_iscsi)" guest2 "$(linux_iscsi)"
            daemon_stop
        fi
        case_end linux-iscsi.fence guest1 guest2
    fi

    if selected linux-iscsi/lu-reset; then
        case_start linux-iscsi/lu-reset
        if daemon_start "$case_dir" "$case_dir/disk.img"; then
            # shellcheck disable=SC2046
            boot guest lu-reset.sh --initiator "$initiator_base:guest1" $(linux_iscsi)
            daemon_stop
        fi
        case_end linux-iscsi.lu-reset guest
    fi

    if selected linux-iscsi/chap; then
        # CHAP on the discovery session and on the target, mutual on both: the kernel's
        # initiator gets in with the right secrets only, and refuses a target that cannot
        # prove itself. Secrets of 12 to 16 bytes, as every initiator takes.
        case_start linux-iscsi/chap
        cat >"$case_dir/sharedisk.toml" <<EOF
control = "control.sock"
[discovery_auth]
chap = { user = "discoverer", secret = "discovery-12ab" }
mutual = { user = "portal-user", secret = "portal-12abcd" }
[[target]]
name = "iqn.2026-01.io.sharedisk:chap"
portals = ["127.0.0.1:0"]
auth.chap = { user = "guest1-user", secret = "initiator-12ab" }
auth.mutual = { user = "target-user", secret = "target-12abcd" }
[[target.lu]]
lun = 0
file = "disk.img"
size = "$img_size"
EOF
        chmod 600 "$case_dir/sharedisk.toml"
        rm -f "$case_dir/disk.img" "$case_dir/disk.img.pr"
        if daemon_config "$case_dir" "$case_dir/sharedisk.toml"; then
            # shellcheck disable=SC2046
            boot guest smoke.sh --initiator "$initiator_base:guest1" $(linux_iscsi) \
                --env ISCSI_DISCOVERY_CHAP="discoverer discovery-12ab" \
                --env ISCSI_DISCOVERY_MUTUAL="portal-user portal-12abcd" \
                --env ISCSI_CHAP="guest1-user initiator-12ab" \
                --env ISCSI_MUTUAL="target-user target-12abcd"
            daemon_stop
        fi
        case_end linux-iscsi.chap guest
    fi

    if selected linux-iscsi/sessions; then
        # Two sessions from one guest, each its own I_T nexus: cases/sessions.sh.
        case_start linux-iscsi/sessions
        if daemon_start "$case_dir" "$case_dir/disk.img"; then
            # shellcheck disable=SC2046
            boot guest sessions.sh --initiator "$initiator_base:guest1" $(linux_iscsi) \
                --env ISCSI_SESSIONS=2
            daemon_stop
        fi
        case_end linux-iscsi.sessions guest
    fi

    if selected linux-iscsi/restart; then
        # The daemon crashes and comes back while the guest writes: the kernel reconnects
        # and retries, and no write it was told was done is lost.
        case_start linux-iscsi/restart
        if daemon_start "$case_dir" "$case_dir/disk.img"; then
            on_sync=restart_step
            # shellcheck disable=SC2046
            boot_together "guest restart.sh --initiator $initiator_base:guest1 $(linux_iscsi)"
            on_sync=
            daemon_stop
        fi
        case_end linux-iscsi.restart guest
    fi

    # 4096-byte logical blocks, through each way a guest reaches the LU: the same checks
    # (one.sh lays its ranges out in bytes, and checks the block size the kernel took).
    if selected vhost-user/4kn; then
        case_start vhost-user/4kn
        s1=$case_dir/vhost1.sock
        if daemon_start "$case_dir" "$case_dir/disk.img" --block-size 4096 --vhost-user "$s1"; then
            one_guest vhost-user "vhost-user:$s1,num_queues=2" "$daemon_url" --env WANT_BLOCK_SIZE=4096
            daemon_stop
        fi
        case_end vhost-user.4kn guest
    fi

    if selected linux-iscsi/4kn; then
        case_start linux-iscsi/4kn
        if daemon_start "$case_dir" "$case_dir/disk.img" --block-size 4096; then
            # shellcheck disable=SC2046
            one_guest linux-iscsi "" "$daemon_url" $(linux_iscsi) --env WANT_BLOCK_SIZE=4096
            daemon_stop
        fi
        case_end linux-iscsi.4kn guest
    fi

    if selected vhost-user/seabios; then
        # Through QEMU's usual firmware, which uses the disk before Linux resets the device.
        case_start vhost-user/seabios
        s1=$case_dir/vhost1.sock
        if daemon_start "$case_dir" "$case_dir/disk.img" --vhost-user "$s1"; then
            boot guest smoke.sh --disk "vhost-user:$s1,num_queues=2" --bios seabios
            daemon_stop
        fi
        case_end vhost-user.seabios guest
    fi

    if selected vhost-user/fence; then
        case_start vhost-user/fence
        s1=$case_dir/vhost1.sock s2=$case_dir/vhost2.sock
        if daemon_start "$case_dir" "$case_dir/disk.img" --vhost-user "$s1" --vhost-user "$s2"; then
            fence guest1 "vhost-user:$s1,num_queues=2" guest2 "vhost-user:$s2,num_queues=2"
            daemon_stop
        fi
        case_end vhost-user.fence guest1 guest2
    fi

    if selected mixed/fence; then
        case_start mixed/fence
        s1=$case_dir/vhost1.sock
        if daemon_start "$case_dir" "$case_dir/disk.img" --vhost-user "$s1"; then
            fence guest1 "vhost-user:$s1,num_queues=2" guest2 "iscsi:$daemon_url"
            daemon_stop
        fi
        case_end mixed.fence guest1 guest2
    fi

    if selected vhost-user/hotplug; then
        case_start vhost-user/hotplug
        s1=$case_dir/vhost1.sock
        if daemon_start "$case_dir" "$case_dir/disk.img" --vhost-user "$s1"; then
            hotplug
            daemon_stop
        fi
        case_end vhost-user.hotplug guest
    fi

    if selected vhost-user/reconnect; then
        case_start vhost-user/reconnect
        s1=$case_dir/vhost1.sock
        if daemon_start "$case_dir" "$case_dir/disk.img" --vhost-user "$s1" \
            --vhost-initiator "$initiator_base:reconnecting"; then
            reconnect "$s1" "$initiator_base:reconnecting"
            daemon_stop
        fi
        case_end vhost-user.reconnect guest2
    fi

    if selected vhost-user/lu-reset; then
        case_start vhost-user/lu-reset
        s1=$case_dir/vhost1.sock
        if daemon_start "$case_dir" "$case_dir/disk.img" --vhost-user "$s1"; then
            boot guest lu-reset.sh --disk "vhost-user:$s1,num_queues=2"
            # Still serving its other paths after the resets.
            if qemu-io -f raw -c "read -q 0 4096" "$daemon_url" >>"$case_dir/host-io.log" 2>&1; then
                host_pass serves-iscsi-after-reset
            else
                host_fail serves-iscsi-after-reset "an iSCSI read failed"
            fi
            daemon_stop
        fi
        case_end vhost-user.lu-reset guest
    fi
}

peer() {
    local s1
    if selected vhost-device-scsi/one; then
        case_start vhost-device-scsi/one
        s1=$case_dir/vhost1.sock
        truncate -s "$img_size" "$case_dir/disk.img"
        if peer_start "$case_dir" "$case_dir/disk.img" "$s1"; then
            # vhost-device-scsi serves one request queue and no parameter changes.
            one_guest vhost-device-scsi "vhost-user:$s1,num_queues=1,param_change=off" "$case_dir/disk.img"
            kill -TERM "$daemon_pid" 2>/dev/null || true
            wait "$daemon_pid" 2>/dev/null || true
        fi
        case_end vhost-device-scsi.one guest
    fi
}

for g in "${groups[@]}"; do
    case $g in
    selftest | sharedisk | peer) "$g" ;;
    *) log "guest tests: unknown group $g"; exit 2 ;;
    esac
done
echo "guest: $passed passed, $failed failed"
((failed == 0))
