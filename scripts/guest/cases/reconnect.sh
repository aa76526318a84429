#!/bin/sh
# A guest that disconnects, and the next on the same vhost-user socket (test.sh's
# vhost-user/reconnect). Whatever guest is on the socket is the socket's one I_T nexus, named
# by the daemon's --vhost-initiator: both guests are that nexus, lost in between.
#
# ROLE=1: registers key 0xabc1, reserves Write Exclusive (type 1), writes /data/pattern at
# 4 MiB and checks that READ FULL STATUS names its registration by the socket's configured
# initiator name (WANT_INITIATOR), then stops at SYNC "held". The host checks that its own
# iSCSI writes fail while `sharedisk pr show` names this nexus as the holder, kills this
# guest's QEMU (no release, no unregistering), and checks both again: a persistent
# reservation survives I_T nexus loss (SPC-5).
# ROLE=2: the same socket, served again without restarting the daemon: the disk appears, the
# pattern reads back, and the registration and the reservation are still there and still this
# nexus's: it writes as the holder, releases with its key and unregisters (after which the
# host's iSCSI writes succeed again).
. /lib.sh
. /etc/test.env

key=0xabc1
first_disk
clear_ua "$dev"
bs=$(cat "/sys/block/$disk/queue/logical_block_size")
at=$((4194304 / bs))

if [ "$ROLE" = 1 ]; then
    expect_rc register 0 sg_persist -n --out --register --param-sark="$key" "$dev"
    expect_rc reserve 0 sg_persist -n --out --reserve --param-rk="$key" --prout-type=1 "$dev"
    expect_rc write-pattern 0 dd if=/data/pattern of="$dev" bs=65536 seek=$((at * bs / 65536)) \
        oflag=direct conv=notrunc,fsync
    full=$(sg_persist -n --in --read-full-status "$dev" 2>&1)
    echo "$full"
    if echo "$full" | grep -qw "Key=$key" && echo "$full" | grep -qF "$WANT_INITIATOR"; then
        pass full-status-names-initiator "$WANT_INITIATOR holds $key"
    else
        fail full-status-names-initiator "want $key held by $WANT_INITIATOR: $(echo "$full" | tr '\n' ' ')"
    fi
    # The host kills this guest here: sync_point returns only on GO, which the host never
    # sends (on ABORT it ends the script itself).
    sync_point held
    finish
fi

dd if="$dev" of=/tmp/back bs=65536 skip=$((at * bs / 65536)) count=16 iflag=direct 2>/dev/null
cmp -s /data/pattern /tmp/back && pass pattern-reads-back "the first guest's write is there" ||
    fail pattern-reads-back "the 1 MiB the first guest wrote differs"
k=$(pr_keys "$dev")
case $k in
*"keys=$key") pass registration-outlives-nexus "$k" ;;
*) fail registration-outlives-nexus "$k, want only $key" ;;
esac
r=$(pr_reservation "$dev")
case $r in
"generation="*" holder=$key type=Write_Exclusive") pass reservation-outlives-nexus "$r" ;;
*) fail reservation-outlives-nexus "$r, want holder $key type Write Exclusive" ;;
esac
# Only the holder may write under Write Exclusive: this is the same I_T nexus.
dd if=/dev/urandom of=/tmp/r bs=65536 count=16 2>/dev/null
expect_rc write-as-holder 0 dd if=/tmp/r of="$dev" bs=65536 seek=256 oflag=direct conv=notrunc
expect_rc read 0 dd if="$dev" of=/tmp/back2 bs=65536 skip=256 count=16 iflag=direct
cmp -s /tmp/r /tmp/back2 && pass read-back "1 MiB reads back" || fail read-back "data differs"
expect_rc release 0 sg_persist -n --out --release --param-rk="$key" --prout-type=1 "$dev"
expect_rc unregister 0 sg_persist -n --out --register --param-rk="$key" --param-sark=0 "$dev"
k=$(pr_keys "$dev")
case $k in
*"keys=none") pass unregistered "$k" ;;
*) fail unregistered "$k, want none" ;;
esac
finish
