# Helpers for guest test scripts (busybox sh), sourced as /lib.sh. See init for the results
# channel (fd 3); besides the lines init lists, `finish` writes "FINISH N" on it. Every check
# prints one RESULT line; a script ends with `finish`, which reports FINISH N and exits with N,
# the number of failed checks (capped): the host requires DONE N to follow, so a script that
# ends any other way (an early exit, a crash) fails its case.

failures=0

# pass NAME [DETAIL] / fail NAME [DETAIL]
pass() { name=$1; shift; echo "RESULT $name PASS $*" >&3; echo "[guest] PASS $name $*"; }
fail() {
    name=$1; shift
    echo "RESULT $name FAIL $*" >&3
    echo "[guest] FAIL $name $*"
    failures=$((failures + 1))
}

# value NAME VALUE: a value the host compares with other guests' (or its own knowledge).
value() { echo "VALUE $1 $2" >&3; echo "[guest] VALUE $1 $2"; }

# expect_rc NAME WANT CMD...: runs CMD (output to the console), checks its exit status.
expect_rc() {
    name=$1 want=$2
    shift 2
    echo "[guest] \$ $*"
    "$@"
    rc=$?
    if [ "$rc" -eq "$want" ]; then pass "$name" "exit $rc"; else fail "$name" "exit $rc, want $want: $*"; fi
    return 0
}

# check NAME CMD...: passes when CMD exits 0.
check() { n=$1; shift; expect_rc "$n" 0 "$@"; }

# sync_point NAME: tells the host this guest reached NAME and waits for "GO NAME".
sync_point() {
    echo "SYNC $1" >&3
    echo "[guest] sync $1"
    while read -r word arg <&3; do
        if [ "$word" = GO ] && [ "$arg" = "$1" ]; then return 0; fi
        if [ "$word" = ABORT ]; then echo "[guest] host aborted"; finish; fi
    done
    fail "sync-$1" "results channel closed"
    finish
}

# wait_disks N [SECONDS]: waits until N SCSI disks (sd*) exist; prints them, in name order.
wait_disks() {
    want=$1 secs=${2:-30}
    i=0
    while [ "$i" -lt $((secs * 10)) ]; do
        n=$(ls /sys/block | grep -c '^sd')
        [ "$n" -ge "$want" ] && break
        usleep 100000
        i=$((i + 1))
    done
    ls /sys/block | grep '^sd' | sort
}

# first_disk: waits up to 30 s for the first SCSI disk and sets disk (sdX) and dev (/dev/sdX),
# with the check disk-appears; without one, the script ends there.
first_disk() {
    disk=$(wait_disks 1 30 | head -n1)
    [ -n "$disk" ] || { fail disk-appears "no /dev/sd* after 30 s"; finish; }
    dev=/dev/$disk
    pass disk-appears "$dev"
}

# sg_of DISK: the sg node (/dev/sgN) of a disk (sdX).
sg_of() { ls "/sys/block/$1/device/scsi_generic" 2>/dev/null | head -n1 | sed 's,^,/dev/,'; }

# finish: ends the script with the number of failed checks as its status, after reporting it
# (FINISH N) on the results channel.
finish() {
    [ "$failures" -gt 100 ] && failures=100
    echo "FINISH $failures" >&3
    exit "$failures"
}
