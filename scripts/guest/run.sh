#!/usr/bin/env bash
# Boots one test guest under QEMU (TCG) with one or more SCSI disks, runs a guest script in it
# and waits for it to power off.
#
#   scripts/guest/run.sh --dir DIR --name NAME --script FILE [options]
#
#   --disk SPEC         repeatable; each disk gets its own controller:
#                         scsi-hd:IMAGE[,PROPS]      QEMU's virtio-scsi + scsi-hd on a raw image;
#                                                    PROPS: aio=threads|native|io_uring and
#                                                    cache=none|writeback|... of the drive
#                                                    (default aio=threads,cache=none),
#                                                    num_queues=N of the controller
#                         vhost-user:SOCKET[,PROPS]  vhost-user-scsi-pci on SOCKET; PROPS are added
#                                                    to the device (e.g. num_queues=2)
#                         iscsi:URL                  QEMU's virtio-scsi + scsi-block over QEMU's
#                                                    own iSCSI initiator (SCSI passthrough)
#                         null:SIZE[,num_queues=N]   QEMU's virtio-scsi + scsi-hd over QEMU's
#                                                    null-co driver (no storage: reads return
#                                                    zeros, writes are dropped), SIZE bytes
#   --initiator IQN     the iSCSI initiator name of this guest: of QEMU's initiator (iscsi:
#                       disks), and GUEST_INITIATOR in the guest script's environment (for
#                       Linux's own initiator in the guest, see lib.sh's iscsi_attach)
#   --nic user          a virtio-net NIC on QEMU's user networking, where the guest reaches
#                       the host's loopback at 10.0.2.2 (the guest's own iSCSI initiator)
#   --data NAME=FILE    repeatable; FILE is /data/NAME in the guest
#   --env KEY=VALUE     repeatable; exported to the guest script
#   --timeout SECONDS   default 300
#   --mem SIZE          default 512M
#   --smp N             vCPUs, default 1
#   --guest DIR         the built guest (default: the output of scripts/guest/build.sh)
#   --bios FILE         the firmware; default qboot.rom, which boots the kernel at once and
#                       leaves the disks alone; "seabios" is QEMU's usual firmware, which drives
#                       virtio-scsi disks itself (INQUIRY, READ of the boot sector) before Linux
#                       resets the device and takes over, as in a real VM
#
# Files in DIR: NAME.console (ttyS0: kernel and script output), NAME.results (ttyS1: the
# RESULT/VALUE/SYNC/DONE lines, see init), NAME.ctl.in (a FIFO: lines written to it reach the
# guest's ttyS1, e.g. "GO NAME" after a SYNC), NAME.pid (QEMU's pid while it runs).
# Exit status: 0 when the script ended with "DONE 0" and no check failed; 1 when a check failed
# or the script ended with another status (the caller judges the results); 124 on timeout; 3
# when QEMU failed (exited with a status other than 0); 2 on a usage error.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
dir= name= script= guest= initiator= nic=
timeout=300 mem=512M smp=1 bios=qboot.rom
disks=() data=() envs=()
while (($#)); do
    case $1 in
    --dir) dir=$2; shift 2 ;;
    --name) name=$2; shift 2 ;;
    --script) script=$2; shift 2 ;;
    --disk) disks+=("$2"); shift 2 ;;
    --initiator) initiator=$2; shift 2 ;;
    --nic) nic=$2; shift 2 ;;
    --data) data+=("$2"); shift 2 ;;
    --env) envs+=("$2"); shift 2 ;;
    --timeout) timeout=$2; shift 2 ;;
    --mem) mem=$2; shift 2 ;;
    --smp) smp=$2; shift 2 ;;
    --guest) guest=$2; shift 2 ;;
    --bios) bios=$2; shift 2 ;;
    *) echo "run.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
[[ -n $dir && -n $name && -n $script ]] || { echo "run.sh: --dir, --name and --script are required" >&2; exit 2; }
[[ -f $script ]] || { echo "run.sh: no script $script" >&2; exit 2; }
command -v qemu-system-x86_64 >/dev/null || { echo "run.sh: qemu-system-x86_64 not found" >&2; exit 2; }
[[ -z $nic || $nic == user ]] || { echo "run.sh: unknown --nic $nic" >&2; exit 2; }
[[ -n $guest ]] || guest=$("$here/build.sh")
[[ -z $initiator ]] || envs+=("GUEST_INITIATOR=$initiator")
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)

# The per-boot initramfs: the script, the helpers, the data files and the environment.
extra=$(mktemp -d)
trap 'rm -rf "$extra"' EXIT
mkdir -p "$extra/data" "$extra/etc"
install -m 0755 "$script" "$extra/test.sh"
install -m 0644 "$here/lib.sh" "$extra/lib.sh"
for d in "${data[@]}"; do
    cp "${d#*=}" "$extra/data/${d%%=*}"
done
: >"$extra/etc/test.env"
for e in "${envs[@]}"; do
    printf 'export %s=%q\n' "${e%%=*}" "${e#*=}" >>"$extra/etc/test.env"
done
(cd "$extra" && find . | LC_ALL=C sort | "$guest/busybox" cpio -o -H newc 2>/dev/null) | gzip -1 >"$dir/$name.test.cpio.gz"
cat "$guest/base.cpio.gz" "$dir/$name.test.cpio.gz" >"$dir/$name.initrd"

# The machine. Guest memory is a shared memfd so vhost-user back ends can map it.
args=(-accel tcg -cpu max -smp "$smp" -m "$mem" -nodefaults -display none -no-reboot
    -object "memory-backend-memfd,id=mem,size=$mem,share=on" -numa node,memdev=mem
    -kernel "$guest/vmlinuz" -initrd "$dir/$name.initrd"
    -append "console=ttyS0 loglevel=4 panic=-1 quiet"
    -serial "file:$dir/$name.console"
    -chardev "pipe,id=ctl,path=$dir/$name.ctl"
    -serial chardev:ctl)
[[ $bios == seabios ]] || args+=(-bios "$bios")
[[ -z $initiator ]] || args+=(-iscsi "initiator-name=$initiator")
# No option ROM: the firmware does not boot from the network.
[[ -z $nic ]] || args+=(-netdev user,id=net0 -device virtio-net-pci,netdev=net0,romfile=)
i=0
for spec in "${disks[@]}"; do
    kind=${spec%%:*} rest=${spec#*:}
    case $kind in
    scsi-hd)
        img=${rest%%,*} aio=threads cache=none ctl=
        if [[ $rest == *,* ]]; then
            IFS=, read -ra props <<<"${rest#*,}"
            for p in "${props[@]}"; do
                case $p in
                aio=*) aio=${p#aio=} ;;
                cache=*) cache=${p#cache=} ;;
                num_queues=*) ctl+=,$p ;;
                *) echo "run.sh: unknown scsi-hd property $p" >&2; exit 2 ;;
                esac
            done
        fi
        args+=(-drive "file=$img,format=raw,if=none,id=d$i,cache=$cache,aio=$aio"
            -device "virtio-scsi-pci,id=scsi$i$ctl" -device "scsi-hd,drive=d$i,bus=scsi$i.0,wwn=0x5000c50015ea71a$i")
        ;;
    iscsi)
        args+=(-drive "file=$rest,format=raw,if=none,id=d$i,cache=none"
            -device "virtio-scsi-pci,id=scsi$i" -device "scsi-block,drive=d$i,bus=scsi$i.0")
        ;;
    null)
        size=${rest%%,*} ctl=
        [[ $rest == *,* ]] && ctl=,${rest#*,}
        args+=(-blockdev "null-co,node-name=d$i,size=$size,read-zeroes=on"
            -device "virtio-scsi-pci,id=scsi$i$ctl" -device "scsi-hd,drive=d$i,bus=scsi$i.0,wwn=0x5000c50015ea71a$i")
        ;;
    vhost-user)
        sock=${rest%%,*} props=
        [[ $rest == *,* ]] && props=,${rest#*,}
        args+=(-chardev "socket,id=vus$i,path=$sock"
            -device "vhost-user-scsi-pci,chardev=vus$i$props")
        ;;
    *) echo "run.sh: unknown disk kind $kind" >&2; exit 2 ;;
    esac
    i=$((i + 1))
done

rm -f "$dir/$name.ctl.in" "$dir/$name.ctl.out" "$dir/$name.results" "$dir/$name.console"
mkfifo "$dir/$name.ctl.in" "$dir/$name.ctl.out"
# QEMU opens both FIFOs read-write, so neither open blocks; the reader below sees end of
# file when QEMU exits.
cat "$dir/$name.ctl.out" >"$dir/$name.results" &
reader=$!
printf '%q ' qemu-system-x86_64 "${args[@]}" >"$dir/$name.cmdline"
echo >>"$dir/$name.cmdline"
start=$(date +%s.%N)
rc=0
timeout -k 5 "$timeout" qemu-system-x86_64 "${args[@]}" 2>"$dir/$name.qemu.log" &
qemu=$!
echo "$qemu" >"$dir/$name.pid"
wait "$qemu" || rc=$?
rm -f "$dir/$name.pid"
for _ in 1 2 3 4 5 6 7 8 9 10; do
    kill -0 "$reader" 2>/dev/null || break
    sleep 0.2
done
kill "$reader" 2>/dev/null || true
wait "$reader" 2>/dev/null || true
end=$(date +%s.%N)
secs=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }')

results=$dir/$name.results
[[ -f $results ]] || : >"$results"
if ((rc == 124)); then
    echo "$name: timed out after ${timeout}s" >&2
    exit 124
fi
if ((rc != 0)); then
    echo "$name: QEMU exited with status $rc (see $dir/$name.qemu.log)" >&2
    tail -n 5 "$dir/$name.qemu.log" >&2 || true
    exit 3
fi
done_line=$(grep '^DONE ' "$results" | tail -n1 || true)
nfail=$(grep -c '^RESULT [^ ]* FAIL' "$results" || true)
echo "$name: ${secs}s, $(grep -c '^RESULT [^ ]* PASS' "$results" || true) passed, $nfail failed, ${done_line:-no DONE line}" >&2
[[ $done_line == "DONE 0" && $nfail -eq 0 ]]
