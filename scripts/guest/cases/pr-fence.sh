#!/bin/sh
# The fence_scsi sequence, two guests (or a guest and another initiator) on one LU, in phases
# the host releases together (SYNC/GO): both register, guest 1 reserves Write Exclusive -
# Registrants Only (type 5), guest 2 preempts and aborts guest 1, after which guest 1's writes
# fail with RESERVATION CONFLICT and guest 2's succeed. Each guest reports what READ KEYS and
# READ RESERVATION show (VALUE lines) at each phase; the host checks they agree.
#
# Environment: ROLE (1 or 2). Keys: guest 1 registers 0x1001, guest 2 0x2002.
. /lib.sh
. /etc/test.env

k1=0x1001 k2=0x2002
if [ "$ROLE" = 1 ]; then mine=$k1; else mine=$k2; fi

first_disk
bs=$(cat "/sys/block/$disk/queue/logical_block_size")
dd if=/dev/urandom of=/tmp/blk bs="$bs" count=1 2>/dev/null
# Each guest writes its own block (guest 1 at 4 MiB, guest 2 one block after).
wlba=$((4194304 / bs + ROLE - 1))

# report PHASE: the state both guests must agree on at this phase.
report() {
    clear_ua "$dev"
    value "$1-keys" "$(pr_keys "$dev")"
    value "$1-reservation" "$(pr_reservation "$dev")"
}

# Phase 1: both register.
clear_ua "$dev"
expect_rc register 0 sg_persist -n --out --register --param-sark="$mine" "$dev"
sync_point registered
report registered
k=$(pr_keys "$dev")
case $k in
*"keys=$k1,$k2") pass sees-both-registered "$k" ;;
*) fail sees-both-registered "$k, want $k1,$k2" ;;
esac

# Phase 2: guest 1 reserves, type 5.
sync_point reported-registered
if [ "$ROLE" = 1 ]; then
    expect_rc reserve 0 sg_persist -n --out --reserve --param-rk="$k1" --prout-type=5 "$dev"
fi
sync_point reserved
report reserved
r=$(pr_reservation "$dev")
case $r in
*"holder=$k1 "*) pass sees-reservation "$r" ;;
*) fail sees-reservation "$r, want holder $k1" ;;
esac
# Both are registrants: both may write under Registrants Only.
expect_rc write-as-registrant 0 sg_write_same --lba="$wlba" --num=1 --in=/tmp/blk "$dev"

# Phase 3: guest 2 preempts guest 1 and aborts its tasks.
sync_point reported-reserved
if [ "$ROLE" = 2 ]; then
    expect_rc preempt-abort 0 sg_persist -n --out --preempt-abort --param-rk="$k2" \
        --param-sark="$k1" --prout-type=5 "$dev"
fi
sync_point preempted
clear_ua "$dev"
if [ "$ROLE" = 1 ]; then
    # No longer registered: writes conflict (sg3_utils exit 24), the kernel fails dd, reads work.
    expect_rc write-conflicts 24 sg_write_same --lba="$wlba" --num=1 --in=/tmp/blk "$dev"
    if dd if=/tmp/blk of="$dev" bs="$bs" seek="$wlba" count=1 oflag=direct conv=notrunc 2>/dev/null; then
        fail dd-write-fails "dd wrote through the reservation"
    else
        pass dd-write-fails "dd failed"
    fi
    dmesg | tail -n 5
    expect_rc read-allowed 0 dd if="$dev" of=/dev/null bs="$bs" skip="$wlba" count=1 iflag=direct
    expect_rc reserve-unregistered-conflicts 24 sg_persist -n --out --reserve --param-rk="$k1" \
        --prout-type=5 "$dev"
else
    expect_rc write-succeeds 0 sg_write_same --lba="$wlba" --num=1 --in=/tmp/blk "$dev"
    expect_rc dd-write-succeeds 0 dd if=/tmp/blk of="$dev" bs="$bs" seek="$wlba" count=1 \
        oflag=direct conv=notrunc
fi
r=$(pr_reservation "$dev")
case $r in
*"holder=$k2 "*) pass sees-preemption "$r" ;;
*) fail sees-preemption "$r, want holder $k2" ;;
esac
k=$(pr_keys "$dev")
case $k in
*"keys=$k2") pass sees-only-guest-2 "$k" ;;
*) fail sees-only-guest-2 "$k, want only $k2" ;;
esac
sync_point written
report preempted
sync_point done
finish
