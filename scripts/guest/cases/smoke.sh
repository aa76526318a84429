#!/bin/sh
# The disk appears and keeps what is written to it. Used to boot through SeaBIOS, which drives
# the disk before Linux resets the device and takes over.
. /lib.sh
. /etc/test.env
first_disk
dd if=/dev/urandom of=/tmp/r bs=65536 count=16 2>/dev/null
expect_rc write 0 dd if=/tmp/r of="$dev" bs=65536 seek=64 oflag=direct conv=notrunc
expect_rc read 0 dd if="$dev" of=/tmp/back bs=65536 skip=64 count=16 iflag=direct
cmp -s /tmp/r /tmp/back && pass read-back "1 MiB reads back" || fail read-back "data differs"
finish
