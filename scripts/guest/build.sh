#!/usr/bin/env bash
# Builds the test guest from Debian packages: a kernel and an initramfs with busybox, the
# virtio-scsi and SCSI disk modules, sg3_utils and fio, and Linux's own iSCSI initiator (the
# virtio-net, iscsi_tcp and crc32c modules, open-iscsi's iscsid and iscsiadm). Prints the
# folder that holds them:
#
#   vmlinuz        the kernel of the linux-image-amd64 package
#   base.cpio.gz   busybox, modules, sg3_utils, fio, open-iscsi and their libraries, /init
#   busybox        the static busybox, whose cpio the host uses for the per-boot initramfs
#
# The test script is not in it: scripts/guest/run.sh appends a small second initramfs with the
# script for each boot, so this one is built once per set of package versions and cached under
# ${SHAREDISK_GUEST_CACHE:-~/.cache/sharedisk-guest}/KEY, where KEY hashes the exact package
# versions and this folder's build inputs (this script and init).
#
# Needs apt (Debian 12, amd64). Runs `apt-get update` when the package lists are missing.
# Usage: scripts/guest/build.sh            (prints the folder on stdout; progress on stderr)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
cache=${SHAREDISK_GUEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sharedisk-guest}
mkdir -p "$cache/debs"

log() { printf 'guest build: %s\n' "$*" >&2; }
die() { printf 'guest build: error: %s\n' "$*" >&2; exit 1; }

# Modules to load, in this order (each after those it needs; no modprobe in the guest).
modules=(crct10dif_common crct10dif_generic crc-t10dif crc64 crc64-rocksoft
    crc64_rocksoft_generic t10-pi virtio_ring virtio virtio_pci_legacy_dev
    virtio_pci_modern_dev virtio_pci scsi_common scsi_mod virtio_scsi sd_mod sg
    failover net_failover virtio_net crc32c_generic
    scsi_transport_iscsi libiscsi libiscsi_tcp iscsi_tcp)
# sg3_utils tools the guest scripts call.
sg_tools=(sg_inq sg_vpd sg_readcap sg_compare_and_write sg_write_same sg_unmap
    sg_get_lba_status sg_persist sg_reset sg_turs sg_raw sg_dd sg_rtpg sg_luns sg_sync)

command -v apt-get >/dev/null || die "apt-get not found (Debian only)"
[[ $(dpkg --print-architecture) == amd64 ]] || die "amd64 only"

# The package lists must be there to resolve versions.
if ! apt-cache show --no-all-versions linux-image-amd64 >/dev/null 2>&1; then
    log "apt-get update"
    apt-get update -q >&2
fi

# The real kernel package behind the linux-image-amd64 meta package.
kernel_pkg=$(apt-cache depends linux-image-amd64 | awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }')
[[ -n $kernel_pkg ]] || die "cannot resolve linux-image-amd64 to a kernel package"

# open-iscsi's programs (the kernel's iSCSI initiator is driven by iscsid; iscsiadm logs in).
iscsi_tools=(iscsid iscsiadm)

# Library packages fio, sg3_utils and open-iscsi may need: their dependency closure, less the
# tools and scripting runtimes (the ld.so closure below picks the files actually needed), and
# less elogind's, whose libsystemd.so.0 would otherwise stand in for libsystemd0's.
mapfile -t libs < <(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts \
        --no-breaks --no-replaces --no-enhances fio sg3-utils open-iscsi |
    grep -v '^ ' | grep -E '^(lib|zlib1g$)' | grep -Ev -- '-(perl|dev|bin|data|tools)$|^libpython' |
    grep -v '^libelogind' | sort -u)
pkgs=("$kernel_pkg" busybox-static sg3-utils fio open-iscsi "${libs[@]}")

# Exact versions (and checksums) of what would be downloaded: the cache key.
uris=$(apt-get download --print-uris "${pkgs[@]}" 2>/dev/null) ||
    die "apt-get download --print-uris failed for: ${pkgs[*]}"
key=$({
    printf '%s\n' "$uris" | awk '{ print $2, $4 }' | sort
    cat "$here/build.sh" "$here/init"
} | sha256sum | cut -c1-16)
out=$cache/$key
if [[ -f $out/done ]]; then
    log "cached: $out"
    printf '%s\n' "$out"
    exit 0
fi

log "downloading ${#pkgs[@]} packages"
download() { (cd "$cache/debs" && apt-get -q -o APT::Sandbox::User=root download "${pkgs[@]}" >&2); }
if ! download; then
    # Stale package lists name versions the archive no longer has: refresh once.
    [[ -z ${SHAREDISK_GUEST_REFRESHED:-} ]] || die "apt-get download failed"
    log "apt-get update, then resolving again"
    apt-get update -q >&2
    SHAREDISK_GUEST_REFRESHED=1 exec "$0" "$@"
fi

work=$(mktemp -d "$cache/build.XXXXXX")
trap 'rm -rf "$work"' EXIT
tree=$work/tree # every package unpacked
root=$work/root # the initramfs
mkdir -p "$tree" "$root"
# One file name per package and version, as apt-get download names them.
printf '%s\n' "$uris" | awk '{ print $2 }' | while read -r deb; do
    [[ -f $cache/debs/$deb ]] || die "missing download $deb"
    dpkg -x "$cache/debs/$deb" "$tree"
done

# Kernel and modules.
kver=${kernel_pkg#linux-image-}
cp "$tree/boot/vmlinuz-$kver" "$work/vmlinuz"
mkdir -p "$root/lib/modules"
: >"$root/etc.modules"
for m in "${modules[@]}"; do
    # File names use - or _ freely; match either.
    pat=$(printf '%s' "$m" | sed 's/[-_]/[-_]/g')
    ko=$(find "$tree/lib/modules/$kver/kernel" -regextype posix-extended \
        -regex ".*/$pat\.ko(\.xz|\.zst)?" | head -n1)
    [[ -n $ko ]] || die "module $m not in $kernel_pkg"
    case $ko in
    *.xz) xz -dc "$ko" >"$root/lib/modules/$m.ko" ;;
    *.zst) zstd -qdc "$ko" >"$root/lib/modules/$m.ko" ;;
    *) cp "$ko" "$root/lib/modules/$m.ko" ;;
    esac
    echo "$m" >>"$root/etc.modules"
done

# Busybox and its applets.
mkdir -p "$root/bin" "$root/sbin" "$root/usr/bin" "$root/usr/sbin" "$root/etc" \
    "$root/proc" "$root/sys" "$root/dev" "$root/tmp" "$root/run" "$root/lib64"
mv "$root/etc.modules" "$root/etc/modules"
cp "$tree/bin/busybox" "$root/bin/busybox"
"$root/bin/busybox" --list-full | while read -r applet; do
    [[ -e $root/$applet ]] || ln -s /bin/busybox "$root/$applet"
done

# sg3_utils, fio, open-iscsi, and the libraries they load (found by the packages' own ld.so).
ldso=$tree/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2
[[ -x $ldso ]] || die "no ld.so in libc6"
libpath=$tree/lib/x86_64-linux-gnu:$tree/usr/lib/x86_64-linux-gnu:$tree/usr/lib/x86_64-linux-gnu/ceph
bins=()
for t in "${sg_tools[@]}"; do bins+=("$tree/usr/bin/$t"); done
bins+=("$tree/usr/bin/fio")
for t in "${iscsi_tools[@]}"; do
    # /sbin in Debian 12's package, /usr/sbin in later ones.
    if [[ -f $tree/sbin/$t ]]; then bins+=("$tree/sbin/$t"); else bins+=("$tree/usr/sbin/$t"); fi
done
for b in "${bins[@]}"; do
    [[ -f $b ]] || die "missing $b"
    cp "$b" "$root${b#"$tree"}"
    listing=$("$ldso" --library-path "$libpath" --list "$b") || die "ld.so --list $b failed"
    if grep -q 'not found' <<<"$listing"; then
        die "unresolved libraries for $b: $(grep 'not found' <<<"$listing" | tr -s ' \t' ' ')"
    fi
    awk '$2 == "=>" { print $3 }' <<<"$listing" | while read -r lib; do
        case $lib in
        "$tree"/*) ;;
        *) die "$b resolved $lib outside the packages" ;;
        esac
        dest=$root${lib#"$tree"}
        [[ -e $dest ]] || { mkdir -p "$(dirname "$dest")" && cp -L "$lib" "$dest"; }
    done
done
cp -L "$ldso" "$root/lib64/ld-linux-x86-64.so.2"
mkdir -p "$root/lib/x86_64-linux-gnu"
ln -sf /lib64/ld-linux-x86-64.so.2 "$root/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"

install -m 0755 "$here/init" "$root/init"
printf '%s\n' "$uris" | awk '{ print $2 }' | sort >"$root/etc/packages"

# The archive: newc, built with the packaged busybox's own cpio.
(cd "$root" && find . | LC_ALL=C sort | "$root/bin/busybox" cpio -o -H newc 2>/dev/null) |
    gzip -1 >"$work/base.cpio.gz"
cp "$root/etc/packages" "$work/packages"
mkdir -p "$out.tmp"
mv "$work/vmlinuz" "$work/base.cpio.gz" "$work/packages" "$out.tmp/"
cp "$root/bin/busybox" "$out.tmp/busybox" # the host uses its cpio for the per-boot initramfs
rm -rf "$out"
mv "$out.tmp" "$out"
touch "$out/done"
log "built $out ($(du -h "$out/base.cpio.gz" | cut -f1) initramfs, kernel $kver)"
printf '%s\n' "$out"
