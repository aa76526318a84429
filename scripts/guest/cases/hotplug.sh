#!/bin/sh
# Run-time LU changes over vhost-user-scsi. The guest boots with LUN 0. At SYNC "booted" the
# host runs `sharedisk lu add` for LUN 1 (an image it filled with /data/pattern at 0): the
# guest must see a new disk, at H:C:T:L ...:0:1 (the LUN the event names, as REPORT LUNS names
# it), within 30 s, read the pattern from it and write /data/to-host at 1 MiB. At SYNC "grow"
# the host doubles LUN 1's image and runs `sharedisk lu rescan`: the disk must take the new
# size within 30 s with nothing asked here (a VIRTIO_SCSI_T_PARAM_CHANGE event, CAPACITY DATA
# HAS CHANGED, makes Linux rescan it; the unit attention alone does not resize a disk). At SYNC
# "added" the host runs `sharedisk lu remove` for it: the disk must go within 30 s, and LUN 0
# keep serving. The host then reads what the guest wrote from the image.
#
# Environment: LUN1_BYTES (the size of LUN 1's image).
. /lib.sh
. /etc/test.env

first_disk
# H:C:T:L of a disk.
hctl() { basename "$(readlink -f "/sys/block/$1/device")"; }
lun0=$(hctl "$disk")
value lun0-hctl "$lun0"
# Whether the driver asked for events (VIRTIO_SCSI_F_HOTPLUG is bit 1 of the features).
features=$(cat /sys/bus/virtio/devices/*/features 2>/dev/null | head -n1)
echo "[guest] virtio features $features"
case $features in
?1*) pass hotplug-negotiated "VIRTIO_SCSI_F_HOTPLUG acked" ;;
*) fail hotplug-negotiated "features $features" ;;
esac

sync_point booted
# The host has added LUN 1: a disk other than LUN 0's appears.
new= i=0
while [ "$i" -lt 300 ]; do
    for d in $(ls /sys/block | grep '^sd'); do
        [ "$d" = "$disk" ] || new=$d
    done
    [ -n "$new" ] && break
    usleep 100000
    i=$((i + 1))
done
dmesg | tail -n 8
if [ -z "$new" ]; then
    fail lun1-appears "no new /dev/sd* 30 s after lu add"
    sync_point added
    finish
fi
pass lun1-appears "/dev/$new after $((i / 10)).$((i % 10)) s"
h=$(hctl "$new")
value lun1-hctl "$h"
case $h in
"${lun0%:*}:1") pass lun1-address "$h" ;;
*) fail lun1-address "$h, want ${lun0%:*}:1" ;;
esac
# The device node follows the sysfs entry.
i=0
while [ ! -b "/dev/$new" ] && [ "$i" -lt 50 ]; do usleep 100000; i=$((i + 1)); done
bytes=$(($(cat "/sys/block/$new/size") * 512))
[ "$bytes" = "$LUN1_BYTES" ] && pass lun1-size "$bytes bytes" ||
    fail lun1-size "$bytes bytes, want $LUN1_BYTES"
n=$(wc -c </data/pattern)
dd if="/dev/$new" of=/tmp/got bs=65536 count=$((n / 65536)) iflag=direct 2>/dev/null
cmp -s /tmp/got /data/pattern && pass lun1-reads-pattern "$n bytes as the host wrote them" ||
    fail lun1-reads-pattern "LUN 1 does not read back the host's pattern"
expect_rc lun1-write 0 dd if=/data/to-host of="/dev/$new" bs=65536 seek=16 oflag=direct \
    conv=notrunc
# LUN 0 is untouched.
expect_rc lun0-reads 0 dd if="/dev/$disk" of=/dev/null bs=65536 count=16 iflag=direct

sync_point grow
want=$((LUN1_BYTES * 2))
i=0
while [ "$(($(cat "/sys/block/$new/size") * 512))" != "$want" ] && [ "$i" -lt 300 ]; do
    usleep 100000
    i=$((i + 1))
done
dmesg | tail -n 4
bytes=$(($(cat "/sys/block/$new/size") * 512))
[ "$bytes" = "$want" ] && pass lun1-grows "$bytes bytes after $((i / 10)).$((i % 10)) s" ||
    fail lun1-grows "$bytes bytes 30 s after lu rescan, want $want"
# The new end reads (zeros: the image grew sparse).
expect_rc lun1-reads-new-end 0 dd if="/dev/$new" of=/dev/null bs=65536 \
    skip=$((want / 65536 - 1)) count=1 iflag=direct

sync_point added
# The host has removed LUN 1: its disk goes.
i=0
while [ -e "/sys/block/$new" ] && [ "$i" -lt 300 ]; do
    usleep 100000
    i=$((i + 1))
done
dmesg | tail -n 8
if [ -e "/sys/block/$new" ]; then
    fail lun1-goes "/dev/$new still there 30 s after lu remove"
else
    pass lun1-goes "/dev/$new gone after $((i / 10)).$((i % 10)) s"
fi
left=$(ls /sys/block | grep '^sd' | tr '\n' ' ')
[ "$left" = "$disk " ] && pass only-lun0-left "$left" || fail only-lun0-left "disks: $left"
expect_rc lun0-reads-after 0 dd if="/dev/$disk" of=/dev/null bs=65536 count=16 iflag=direct
sync_point removed
finish
