#!/usr/bin/env bash
# The one test command: installs what the tests need, then runs every check.
#
#   format, lints, docs -> unit + integration tests (debug, then release) -> fuzz targets build
#   -> conformance parser self-test -> Linux guests under QEMU -> libiscsi conformance run
#   against the daemon
#
# Works as root on a fresh Debian 12 machine with the Rust toolchain (CI runs it from .ci/run).
# Stops at the first failing step. The last line is the conformance run's summary,
# "N passed, N failed, N skipped".
set -euo pipefail

cd "$(dirname "$0")/.."

step() {
    printf '\n==> %s\n' "$*"
}

# Debian packages the tests use, by the command that tells whether each is there.
declare -A packages=(
    [iscsi-test-cu]=libiscsi-bin
)
missing=()
for cmd in "${!packages[@]}"; do
    command -v "$cmd" >/dev/null || missing+=("${packages[$cmd]}")
done
if ((${#missing[@]})); then
    step "Installing ${missing[*]}"
    if [[ $(id -u) -ne 0 ]]; then
        echo "test.sh: missing ${missing[*]}; run as root or install them" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

step "cargo fmt --check"
cargo fmt --all --check

step "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "cargo doc"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked

step "cargo test (debug)"
cargo test --workspace --locked --no-fail-fast

step "cargo test (release)"
cargo test --workspace --release --locked --no-fail-fast

step "Fuzz targets build"
scripts/fuzz-build.sh

step "Conformance parser self-test"
scripts/conformance/selftest.sh

# --- Linux guests under QEMU (scripts/guest/) ---------------------------------------------
# Real guests (Debian kernel, sg3_utils, fio) booted under QEMU (TCG) against QEMU's own
# scsi-hd and against the daemon over vhost-user-scsi and iSCSI. scripts/guest/test.sh installs
# QEMU through apt when missing and builds the guest from Debian packages (cached under
# ~/.cache/sharedisk-guest); a missing tool fails the step.
step "Guest tests (QEMU)"
scripts/guest/test.sh selftest sharedisk

step "Conformance run (iscsi-test-cu)"
scripts/conformance.sh
