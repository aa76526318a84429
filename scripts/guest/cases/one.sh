#!/bin/sh
# One guest, one disk: the disk shows up, answers the sg3_utils commands of a conformant SBC-4
# disk, survives a fio verify job, and its data matches what the host reads and writes over
# another path (see scripts/guest/test.sh: the host wrote /data/from-host at XCHECK_IN and
# reads XCHECK_OUT back after the guest stops).
#
# Layout on the disk (bytes, so any block size works): 1 MiB compare and write, 2 MiB write
# same, 3 MiB unmap, 8 MiB host -> guest, 16 MiB guest -> host, 32-40 MiB fio, 48-64 MiB fio
# with large requests.
#
# WANT_LBPRZ (from the host, for targets whose LBPRZ it knows): the LBPRZ bit VPD 0xB2 must
# report; then unmapped blocks must read zero. Without it (other targets) they are checked
# only when the target reports LBPRZ=1. WANT_BLOCK_SIZE: the logical block size READ
# CAPACITY must report.
. /lib.sh
. /etc/test.env

first_disk

# --- identification -----------------------------------------------------------------------
check inquiry sg_inq "$dev"
pdt=$(sg_inq "$dev" 2>/dev/null | sed -n 's/.*PDT=\([0-9]*\).*/\1/p' | head -n1)
[ "$pdt" = 0 ] && pass inquiry-pdt "direct access" || fail inquiry-pdt "PDT=$pdt, want 0"

check vpd-0x83 sg_vpd -p 0x83 "$dev"
if sg_vpd -p 0x83 "$dev" 2>/dev/null | grep -q 'NAA'; then
    pass vpd-0x83-naa "an NAA designator"
else
    fail vpd-0x83-naa "no NAA designator"
fi
check vpd-0xb0 sg_vpd -p 0xb0 "$dev"
check vpd-0xb2 sg_vpd -p 0xb2 "$dev"
sg_vpd -p 0xb0 "$dev" >/tmp/b0 2>&1
sg_vpd -p 0xb2 "$dev" >/tmp/b2 2>&1
cat /tmp/b0 /tmp/b2
# field VALUE from "  Some field (XYZ): VALUE" lines
field() { sed -n "s/.*$2[^:]*: *\([0-9a-fx]*\).*/\1/p" "$1" | head -n1; }
lbpu=$(field /tmp/b2 '(LBPU)')
lbpws=$(field /tmp/b2 '(LBPWS)')
lbprz=$(field /tmp/b2 '(LBPRZ)')
value lbp "lbpu=$lbpu lbpws=$lbpws lbprz=$lbprz"
if [ -n "${WANT_LBPRZ:-}" ]; then
    [ "$lbprz" = "$WANT_LBPRZ" ] && pass lbprz "LBPRZ=$lbprz" ||
        fail lbprz "VPD 0xB2 says LBPRZ='$lbprz', want $WANT_LBPRZ"
fi
value max-caw "$(field /tmp/b0 'Maximum compare and write length')"
value max-unmap "$(field /tmp/b0 'Maximum unmap LBA count')"

expect_rc readcap-16 0 sg_readcap -l "$dev"
sg_readcap -l "$dev" >/tmp/cap 2>&1
bs=$(sed -n 's/.*Logical block length=\([0-9]*\).*/\1/p' /tmp/cap | head -n1)
blocks=$(sed -n 's/.*Number of logical blocks=\([0-9]*\).*/\1/p' /tmp/cap | head -n1)
sysbs=$(cat "/sys/block/$disk/queue/logical_block_size")
if [ -n "$bs" ] && [ "$bs" = "$sysbs" ]; then
    pass readcap-block-size "$bs bytes, $blocks blocks"
else
    fail readcap-block-size "READ CAPACITY(16) says ${bs:-?}, the kernel $sysbs"
    bs=$sysbs
fi
value block-size "$bs"
if [ -n "${WANT_BLOCK_SIZE:-}" ]; then
    [ "$bs" = "$WANT_BLOCK_SIZE" ] && pass block-size "$bs" ||
        fail block-size "$bs bytes, want $WANT_BLOCK_SIZE"
fi
value blocks "$blocks"
lba() { echo $(($1 / bs)); }

# readblocks LBA COUNT FILE: reads COUNT blocks at LBA with O_DIRECT
readblocks() { dd if="$dev" of="$3" bs="$bs" skip="$1" count="$2" iflag=direct 2>/dev/null; }
writeblocks() { dd if="$3" of="$dev" bs="$bs" seek="$1" count="$2" oflag=direct conv=notrunc 2>/dev/null; }

# --- COMPARE AND WRITE --------------------------------------------------------------------
dd if=/dev/urandom of=/tmp/a bs="$bs" count=1 2>/dev/null
dd if=/dev/urandom of=/tmp/b bs="$bs" count=1 2>/dev/null
cat /tmp/a /tmp/b >/tmp/a-then-b
caw=$(lba 1048576)
if writeblocks "$caw" 1 /tmp/a; then
    expect_rc caw-match 0 sg_compare_and_write --in=/tmp/a-then-b --lba="$caw" --num=1 \
        --xferlen=$((2 * bs)) "$dev"
    readblocks "$caw" 1 /tmp/now
    cmp -s /tmp/now /tmp/b && pass caw-match-wrote "block is the write half" ||
        fail caw-match-wrote "block is not the write half"
    # The disk holds b now: comparing with a must miscompare (sg3_utils exit 14) and write nothing.
    expect_rc caw-mismatch 14 sg_compare_and_write --in=/tmp/a-then-b --lba="$caw" --num=1 \
        --xferlen=$((2 * bs)) --quiet "$dev"
    readblocks "$caw" 1 /tmp/now
    cmp -s /tmp/now /tmp/b && pass caw-mismatch-unchanged "block unchanged" ||
        fail caw-mismatch-unchanged "the block changed after a miscompare"
else
    fail caw-setup "dd write failed"
fi

# --- WRITE SAME ---------------------------------------------------------------------------
ws=$(lba 2097152)
n=$((65536 / bs))
expect_rc write-same 0 sg_write_same --lba="$ws" --num="$n" --in=/tmp/a "$dev"
readblocks "$ws" "$n" /tmp/ws
i=0 ok=1
while [ "$i" -lt "$n" ]; do
    dd if=/tmp/ws of=/tmp/one bs="$bs" skip="$i" count=1 2>/dev/null
    cmp -s /tmp/one /tmp/a || { ok=0; break; }
    i=$((i + 1))
done
[ "$ok" = 1 ] && pass write-same-data "$n blocks hold the pattern" || fail write-same-data "block $i differs"

dd if=/dev/zero of=/tmp/zeros bs=65536 count=1 2>/dev/null
expect_rc write-same-unmap 0 sg_write_same --unmap --lba="$ws" --num="$n" "$dev"
readblocks "$ws" "$n" /tmp/ws
cmp -s /tmp/ws /tmp/zeros && pass write-same-unmap-zeros "reads zeros" ||
    fail write-same-unmap-zeros "does not read zeros"

# --- UNMAP and GET LBA STATUS -------------------------------------------------------------
um=$(lba 3145728)
dd if=/dev/urandom of=/tmp/r bs=65536 count=1 2>/dev/null
writeblocks "$um" "$n" /tmp/r || fail unmap-setup "dd write failed"
expect_rc get-lba-status-mapped 0 sg_get_lba_status --lba="$um" "$dev"
st=$(sg_get_lba_status -bb --lba="$um" "$dev" 2>/dev/null)
[ "$st" = 0 ] && pass lba-status-written-mapped "written LBA is mapped" ||
    fail lba-status-written-mapped "status '$st', want 0 (mapped)"
expect_rc unmap 0 sg_unmap --force --lba="$um" --num="$n" "$dev"
if [ "$lbprz" = 1 ] || [ "${WANT_LBPRZ:-}" = 1 ]; then
    readblocks "$um" "$n" /tmp/now
    cmp -s /tmp/now /tmp/zeros && pass unmap-zeros "LBPRZ=1 and reads zeros" ||
        fail unmap-zeros "LBPRZ=1 (or wanted) but unmapped blocks do not read zeros"
fi
st=$(sg_get_lba_status -bb --lba="$um" "$dev" 2>/dev/null)
case $st in
1 | 2) pass lba-status-unmapped "status $st (deallocated or anchored)" ;;
*) fail lba-status-unmapped "status '$st', want 1 or 2" ;;
esac

# --- fio with verify ----------------------------------------------------------------------
expect_rc fio-verify 0 fio --name=verify --filename="$dev" --direct=1 --ioengine=libaio \
    --iodepth=8 --rw=randwrite --bs=4k --offset=32m --size=8m --verify=crc32c \
    --verify_fatal=1 --do_verify=1 --randrepeat=0 --group_reporting
# Large requests, whose data crosses several iSCSI PDUs (immediate data, then Data-Out
# solicited by R2T) or a long descriptor chain.
expect_rc fio-verify-large 0 fio --name=large --filename="$dev" --direct=1 --ioengine=libaio \
    --iodepth=4 --rw=randwrite --bsrange=64k-1m --offset=48m --size=16m --verify=crc32c \
    --verify_fatal=1 --do_verify=1 --randrepeat=0 --group_reporting

# --- the same data over the host's path ---------------------------------------------------
if [ -f /data/from-host ]; then
    len=$(wc -c </data/from-host)
    dd if="$dev" of=/tmp/in bs=65536 skip=$((XCHECK_IN / 65536)) count=$((len / 65536)) \
        iflag=direct 2>/dev/null
    cmp -s /tmp/in /data/from-host && pass host-to-guest "$len bytes written by the host read back" ||
        fail host-to-guest "the guest does not read what the host wrote"
    dd if=/data/to-host of="$dev" bs=65536 seek=$((XCHECK_OUT / 65536)) oflag=direct \
        conv=notrunc 2>/dev/null && sync &&
        pass guest-to-host-written "the host checks it after the guest stops" ||
        fail guest-to-host-written "dd write failed"
fi
finish
