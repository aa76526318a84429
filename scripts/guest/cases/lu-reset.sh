#!/bin/sh
# LOGICAL UNIT RESET while fio runs (through virtio-scsi's control queue, or as an iSCSI task
# management request of Linux's initiator): fio ends by itself (its in-flight I/Os complete or
# fail, nothing hangs), and the disk serves writes and verified reads afterwards. The host
# checks that the target is still serving its other paths.
. /lib.sh
. /etc/test.env

first_disk
# The unit attentions the kernel has seen so far (29h: power on, reset; one after login).
ua_msg='Power-on or device reset occurred'
uas_before=$(dmesg | grep -c "$ua_msg")

# QD16 mixed load for 10 s; it must be over well before 60 s.
timeout 60 fio --name=load --filename="$dev" --direct=1 --ioengine=libaio --iodepth=16 \
    --rw=randrw --bs=4k --size=32m --time_based --runtime=10 --group_reporting >/tmp/fio.log 2>&1 &
fio=$!
sleep 3
# sg_reset -N -d: SG_SCSI_RESET_DEVICE without escalation to a target or bus reset (whose unit
# attention would look the same), which the virtio-scsi driver sends as a LOGICAL UNIT RESET
# task management function on the control queue, and iscsi_tcp as a Task Management Function
# Request (function 5).
expect_rc lu-reset-1 0 sg_reset -N -d "$dev"
sleep 2
expect_rc lu-reset-2 0 sg_reset -N -d "$dev"
wait "$fio"
rc=$?
cat /tmp/fio.log
value fio-during-reset-rc "$rc"
case $rc in
124 | 137) fail fio-ends "fio hung (timeout)" ;;
*) pass fio-ends "fio ended by itself, exit $rc" ;;
esac
dmesg | grep -i 'reset\|abort' | tail -n 20
if [ -n "${ISCSI_PORTAL:-}" ]; then
    # iscsi_tcp logs no line of its own for a reset; the unit attention each reset leaves for
    # this nexus (29h/03h, SAM-5 6.3.3) is what shows it was done.
    resets=$(($(dmesg | grep -c "$ua_msg") - uas_before))
else
    resets=$(dmesg | grep -c ': device reset$')
fi
[ "$resets" -ge 2 ] && pass lu-reset-done "the kernel logged $resets device resets" ||
    fail lu-reset-done "the kernel logged $resets device resets, want 2"

expect_rc tur-after-reset 0 sg_turs "$dev"
expect_rc fio-verify-after-reset 0 fio --name=after --filename="$dev" --direct=1 \
    --ioengine=libaio --iodepth=8 --rw=randwrite --bs=4k --offset=40m --size=4m \
    --verify=crc32c --verify_fatal=1 --do_verify=1 --randrepeat=0
finish
