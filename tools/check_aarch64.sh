#!/usr/bin/env bash
# The CPU backend on aarch64, the CPU of many instruments: jointdiff-cpu cross-built for
# aarch64-unknown-linux-gnu (rustup's standard library for it), linked by Debian's gcc-aarch64-linux-gnu and
# its tests run under qemu-aarch64 (Debian's qemu-user): the NEON direct kernel against the reference
# convolution, 1 vs 2 threads bit for bit, the portable path, clippy for that target. Installs the two Debian
# packages when they are missing; says so and stops (exit 0) where the Rust target is not installed.
#
#   bash tools/check_aarch64.sh
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
TARGET=aarch64-unknown-linux-gnu
if ! rustup target list --installed 2>/dev/null | grep -qx "$TARGET"; then
  echo "check_aarch64: skipped: the $TARGET standard library is not installed (rustup target add $TARGET)"
  exit 0
fi
missing=()
command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 || missing+=(gcc-aarch64-linux-gnu)
command -v qemu-aarch64 >/dev/null 2>&1 || missing+=(qemu-user)
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
cargo clippy -q -p jointdiff-cpu --all-targets --target "$TARGET" -- -D warnings
# release: the tests' convolutions run about 20x slower under emulation than natively in debug
cargo test -q --release -p jointdiff-cpu --target "$TARGET"
echo "check_aarch64: jointdiff-cpu on $TARGET (qemu-aarch64): clippy clean, tests passed on the NEON kernel"
