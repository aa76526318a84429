#!/usr/bin/env bash
# Build the fuzz targets (fuzz/) and give each a short, seeded smoke run.
#
# cargo-fuzz passes nightly-only flags to rustc (-Zsanitizer=address, with the sancov passes
# for libFuzzer). The machine has only the stable toolchain and no other can be fetched, so
# RUSTC_BOOTSTRAP=1 lets this stable rustc accept those flags. That is the documented escape
# hatch for using unstable features on a stable compiler; it is set only for this build.
#
# To fuzz for real: cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run cdb   (or iscsi_pdu, login_text, iscsi_session, scsi_exec, vhost_queues)
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
targets=(cdb iscsi_pdu login_text iscsi_session scsi_exec vhost_queues)

if ! command -v cargo-fuzz >/dev/null; then
    cargo install cargo-fuzz --locked
fi

cd "$root/fuzz"
export RUSTC_BOOTSTRAP=1
cargo fuzz build

# Where cargo put them: CARGO_TARGET_DIR when it is set (as for every other build here).
bin_dir=${CARGO_TARGET_DIR:-$root/fuzz/target}/x86_64-unknown-linux-gnu/release
artifacts=$root/out/fuzz
mkdir -p "$artifacts"
corpus=$(mktemp -d)
trap 'rm -rf "$corpus"' EXIT
for t in "${targets[@]}"; do
    mkdir -p "$corpus/$t"
    # Hand-made inputs that reach deep (fuzz/seeds/README.md), where a target has them; the
    # run mutates copies, so the folder in the tree stays as it is.
    if [[ -d $root/fuzz/seeds/$t ]]; then
        cp "$root/fuzz/seeds/$t"/* "$corpus/$t/"
    fi
    # A fixed seed and run count keep this step deterministic; it catches a parser that
    # panics on simple input, not what a long fuzzing campaign would find.
    timeout 300 "$bin_dir/$t" -seed=1 -runs=20000 -artifact_prefix="$artifacts/$t-" "$corpus/$t" \
        >"$corpus/$t.log" 2>&1 || {
        echo "fuzz: $t failed its smoke run:" >&2
        tail -n 30 "$corpus/$t.log" >&2
        echo "fuzz: the crashing input is in $artifacts" >&2
        exit 1
    }
    echo "fuzz: $t built, 20000 runs clean"
done
