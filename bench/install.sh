# Sourced by the bench scripts: install the clients they need when missing (as root), and
# check that qemu-img has QEMU's iSCSI driver.
#
# QEMU's iSCSI driver is in qemu-block-extra, which Debian 12 ships only for its own QEMU 7.2:
# when the installed qemu-img is a newer one without that driver, this installs qemu-utils 7.2
# from bookworm with it (a downgrade of qemu-img).
need_install=()
command -v iscsi-perf >/dev/null || need_install+=(libiscsi-bin)
command -v tgtd >/dev/null || need_install+=(tgt)
command -v fio >/dev/null || need_install+=(fio)
qemu_iscsi() {
    ls /usr/lib/x86_64-linux-gnu/qemu/block-iscsi.so >/dev/null 2>&1 &&
        qemu-img --version 2>/dev/null | grep -q "version 7\.2"
}
qemu_iscsi || need_install+=(qemu-utils/bookworm qemu-block-extra/bookworm)
if ((${#need_install[@]})); then
    echo "bench: installing ${need_install[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --allow-downgrades --no-install-recommends "${need_install[@]}"
fi
qemu_iscsi || {
    echo "bench: qemu-img has no iSCSI driver" >&2
    exit 1
}

