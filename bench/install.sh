# Sourced by the bench scripts: install the tools they need when missing (as root),
# start_sharedisk and reset_page_cache. What a bench needs is in bench_needs, set before
# sourcing:
#   iscsi (the default)  libiscsi-bin, tgt, fio, and QEMU's iSCSI driver for qemu-img
#   vhost                fio, qemu-system-x86 and vhost-device-scsi (cargo install)
#
# QEMU's iSCSI driver is in qemu-block-extra, which Debian 12 ships only for its own QEMU 7.2:
# when the installed qemu-img is a newer one without that driver, this installs qemu-utils 7.2
# from bookworm with it (a downgrade of qemu-img).
need_install=()
qemu_iscsi() {
    ls /usr/lib/x86_64-linux-gnu/qemu/block-iscsi.so >/dev/null 2>&1 &&
        qemu-img --version 2>/dev/null | grep -q "version 7\.2"
}
command -v fio >/dev/null || need_install+=(fio)
case ${bench_needs:-iscsi} in
iscsi)
    command -v iscsi-perf >/dev/null || need_install+=(libiscsi-bin)
    command -v tgtd >/dev/null || need_install+=(tgt)
    qemu_iscsi || need_install+=(qemu-utils/bookworm qemu-block-extra/bookworm)
    ;;
vhost)
    command -v qemu-system-x86_64 >/dev/null || need_install+=(qemu-system-x86)
    ;;
*)
    echo "bench: unknown bench_needs ${bench_needs}" >&2
    exit 2
    ;;
esac
if ((${#need_install[@]})); then
    echo "bench: installing ${need_install[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --allow-downgrades --no-install-recommends "${need_install[@]}"
fi
case ${bench_needs:-iscsi} in
iscsi)
    qemu_iscsi || {
        echo "bench: qemu-img has no iSCSI driver" >&2
        exit 1
    }
    ;;
vhost)
    if ! command -v vhost-device-scsi >/dev/null; then
        echo "bench: installing vhost-device-scsi"
        cargo install --locked vhost-device-scsi
    fi
    ;;
esac

# start_sharedisk [OPTIONS...]: serve $image on an ephemeral loopback port with OPTIONS, in the
# background; sets server (its pid) and url (its iSCSI URL), logs to $out/sharedisk.log, and
# exits the bench if it does not start. Uses $bin, $image, $work and $out.
start_sharedisk() {
    # A control socket of its own unless OPTIONS name one: the default is shared by every
    # daemon on the machine.
    local control=(--control "$work/control.sock")
    [[ " $* " == *" --control "* ]] && control=()
    "$bin" serve --file "$image" --listen 127.0.0.1:0 "${control[@]}" "$@" \
        >"$work/url" 2>"$out/sharedisk.log" &
    server=$!
    url=""
    for _ in $(seq 300); do
        # The file appears only once the background shell has set up its redirection.
        url=$(head -n 1 "$work/url" 2>/dev/null || true)
        [[ $url == iscsi://* ]] && break
        kill -0 "$server" 2>/dev/null || break
        sleep 0.1
    done
    [[ $url == iscsi://* ]] || {
        echo "bench: sharedisk did not start; see $out/sharedisk.log" >&2
        exit 1
    }
}

# reset_page_cache FILE: the same page-cache state of FILE for every server a bench runs. Its
# dirty pages are written back and its clean ones dropped (this file only), then it is read
# once in 1 MiB blocks with readahead off (POSIX_FADV_RANDOM), so that it is cached in small
# folios, as a server's own 4 KiB random reads would leave it. Otherwise a server would inherit
# what the ones before it left, and the folio sizes decide what a 4 KiB buffered write costs:
# read with readahead (a plain dd), this machine's 6.18 kernel caches the file in large folios,
# and fio's 4 KiB psync random writes to a 1 GiB image on ext4 then ran at 16,688 and 18,109
# IOPS, against 207,736 and 212,975 after this read (two alternating rounds). In a vhost
# bench with large folios, one ext4 function took 80-84% of each back end's write time (perf),
# the same cost for every server.
reset_page_cache() {
    sync "$1"
    dd if="$1" iflag=nocache count=0 status=none
    fio --name=reset-page-cache --filename="$1" --rw=read --bs=1M --fadvise_hint=random \
        --invalidate=0 --output=/dev/null
}
