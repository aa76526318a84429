#!/bin/sh
# Two sessions from one initiator to one target, as multipath setups make (lib.sh's
# iscsi_attach with ISCSI_SESSIONS=2): two disks, one LU. Each session is an I_T nexus of its
# own (the same initiator name, another ISID), so each path registers its own key, and a
# reservation held through one path shuts the other out, as fence_scsi relies on when it
# registers through every path.
. /lib.sh
. /etc/test.env

iscsi_attach
# shellcheck disable=SC2046
set -- $(wait_disks 2 30)
[ $# -eq 2 ] || { fail two-disks "disks: $*"; finish; }
a=/dev/$1 b=/dev/$2
pass two-disks "$a $b"

# One LU: the same identification through both.
for page in 0x80 0x83; do
    sg_vpd -p "$page" "$a" >/tmp/vpd-a 2>&1 && ra=0 || ra=$?
    sg_vpd -p "$page" "$b" >/tmp/vpd-b 2>&1 && rb=0 || rb=$?
    if [ "$ra" -eq 0 ] && [ "$rb" -eq 0 ] && [ -s /tmp/vpd-a ] && cmp -s /tmp/vpd-a /tmp/vpd-b; then
        pass "same-vpd-$page"
    else
        fail "same-vpd-$page" "exit $ra: $(head -c 300 /tmp/vpd-a | tr '\n' ' ') vs exit $rb: $(head -c 300 /tmp/vpd-b | tr '\n' ' ')"
    fi
done

# What one path writes, the other reads.
dd if=/dev/urandom of=/tmp/r bs=65536 count=16 2>/dev/null
expect_rc write-path-a 0 dd if=/tmp/r of="$a" bs=65536 seek=128 oflag=direct conv=notrunc
expect_rc read-path-b 0 dd if="$b" of=/tmp/back bs=65536 skip=128 count=16 iflag=direct
cmp -s /tmp/r /tmp/back && pass path-b-reads-path-a "1 MiB" || fail path-b-reads-path-a "data differs"

keys() { # DEV: the registered keys, sorted, comma-separated ("none" for none)
    k=$(pr_keys "$1")
    echo "${k#generation=* keys=}"
}
clear_ua "$a"
clear_ua "$b"
expect_rc register-path-a 0 sg_persist -n --out --register --param-sark=0xa1 "$a"
k=$(keys "$b")
[ "$k" = 0xa1 ] && pass path-b-sees-a-key "$k" || fail path-b-sees-a-key "'$k', want 0xa1"
# Another nexus: not registered yet, so it registers its own key (from a nexus already
# registered, REGISTER with a zero reservation key would be a RESERVATION CONFLICT).
expect_rc register-path-b 0 sg_persist -n --out --register --param-sark=0xb2 "$b"
k=$(keys "$a")
[ "$k" = "0xa1,0xb2" ] && pass two-registrations "$k" || fail two-registrations "'$k', want 0xa1,0xb2"

# Write Exclusive (type 1) held through path a: path b's writes conflict, its reads do not.
bs=$(cat "/sys/block/$1/queue/logical_block_size")
dd if=/dev/urandom of=/tmp/blk bs="$bs" count=1 2>/dev/null
lba=$((8388608 / bs))
expect_rc reserve-path-a 0 sg_persist -n --out --reserve --param-rk=0xa1 --prout-type=1 "$a"
expect_rc path-a-writes 0 sg_write_same --lba="$lba" --num=1 --in=/tmp/blk "$a"
expect_rc path-b-write-conflicts 24 sg_write_same --lba="$lba" --num=1 --in=/tmp/blk "$b"
expect_rc path-b-reads 0 dd if="$b" of=/dev/null bs="$bs" skip="$lba" count=1 iflag=direct
expect_rc release-path-a 0 sg_persist -n --out --release --param-rk=0xa1 --prout-type=1 "$a"
clear_ua "$b"
expect_rc path-b-writes-after-release 0 sg_write_same --lba="$lba" --num=1 --in=/tmp/blk "$b"
# Both unregister: nothing left behind for the next user of the image.
expect_rc unregister-path-a 0 sg_persist -n --out --register --param-rk=0xa1 "$a"
expect_rc unregister-path-b 0 sg_persist -n --out --register --param-rk=0xb2 "$b"
k=$(keys "$a")
[ "$k" = none ] && pass no-registrations || fail no-registrations "'$k'"
finish
