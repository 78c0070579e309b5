#!/usr/bin/env bash
# Builds the C library and installs it under PREFIX (default /usr/local):
#   PREFIX/lib/libjointdiff.{so,a}, PREFIX/include/jointdiff.h, PREFIX/lib/pkgconfig/jointdiff.pc
set -euo pipefail
PREFIX="${1:-/usr/local}"
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$HERE/../.."
cargo build --release -p jointdiff-capi --manifest-path "$ROOT/Cargo.toml"
VERSION="$(grep -m1 '^version' "$ROOT/Cargo.toml" | sed 's/.*"\(.*\)".*/\1/')"
mkdir -p "$PREFIX/lib/pkgconfig" "$PREFIX/include"
cp "$ROOT/target/release/libjointdiff.so" "$ROOT/target/release/libjointdiff.a" "$PREFIX/lib/"
cp "$HERE/include/jointdiff.h" "$PREFIX/include/"
sed "s|@PREFIX@|$PREFIX|; s|@VERSION@|$VERSION|" "$HERE/jointdiff.pc.in" > "$PREFIX/lib/pkgconfig/jointdiff.pc"
echo "installed jointdiff $VERSION under $PREFIX"
