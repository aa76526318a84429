#!/bin/sh
# The target process dies and comes back while Linux's iSCSI initiator writes (test.sh's
# linux-iscsi/restart: at SYNC "loaded" the host kills the daemon with SIGKILL and starts it
# again on the same image and port). The kernel sees the connection fail, logs in again and
# retries what was in flight; fio's write-then-verify job must end with every block it was
# told was written reading back as written, and data written and flushed before the crash
# must still be there. (A process crash, not a power loss: the host's page cache survives it,
# so this shows the daemon acknowledges nothing it has not handed to the kernel, not that a
# flush reached the disk.)
. /lib.sh
. /etc/test.env

first_disk

# 1 MiB at 1 MiB, written and flushed before the crash.
dd if=/dev/urandom of=/tmp/before bs=65536 count=16 2>/dev/null
check write-before dd if=/tmp/before of="$dev" bs=65536 seek=16 oflag=direct conv=notrunc,fsync

# Writes in flight across the crash: 8 MiB at 8 MiB, queue depth 8, paced at 300 writes a
# second so that the writing lasts about 7 s whatever the machine, then read back and checked
# (fio's verify phase starts once every write was acknowledged). The crash comes 2 s in.
fio --name=crash --filename="$dev" --direct=1 --ioengine=libaio --iodepth=8 --rw=randwrite \
    --bs=4k --offset=8m --size=8m --rate_iops=300 --verify=crc32c --verify_fatal=1 \
    --do_verify=1 --randrepeat=0 >/tmp/fio.log 2>&1 &
fio=$!
sleep 2
if kill -0 "$fio" 2>/dev/null; then
    pass fio-writing-at-crash "fio still running when the host is told to crash the daemon"
else
    fail fio-writing-at-crash "fio ended before the crash"
fi
sync_point loaded
# Bounded: the kernel fails what is queued once its replacement timeout (30 s) passes; a
# fio still running well after that (or 60 s, inside the guest's time limit) is a failure.
i=0
while kill -0 "$fio" 2>/dev/null && [ "$i" -lt 600 ]; do usleep 100000; i=$((i + 1)); done
if kill -0 "$fio" 2>/dev/null; then
    kill -9 "$fio"
    fail fio-across-restart "fio still running 60 s after the restart"
else
    wait "$fio"
    rc=$?
    cat /tmp/fio.log
    [ "$rc" -eq 0 ] && pass fio-across-restart "every write acknowledged reads back (fio verify)" ||
        fail fio-across-restart "fio exit $rc"
fi

dd if="$dev" of=/tmp/after bs=65536 skip=16 count=16 iflag=direct 2>/dev/null
cmp -s /tmp/before /tmp/after && pass data-before-restart "the flushed 1 MiB reads back" ||
    fail data-before-restart "the 1 MiB written before the crash changed"
dmesg | grep -i 'conn error\|session recovery\|reset occurred' | tail -n 10
# The kernel saw the connection fail: the crash happened under this session, not before it.
if dmesg | grep -q 'detected conn error'; then
    pass connection-failed-and-recovered "the kernel detected the crash and logged in again"
else
    fail connection-failed-and-recovered "the kernel never saw the connection fail"
fi
expect_rc tur-after-restart 0 sg_turs "$dev"
iscsi_recovered=1
finish
